"""Cron schedules: named schedules and 5-field expressions in an IANA time zone (docs/api.md §17).

croniter does the matching on naive local wall-clock times; this module owns the syntax it
accepts (croniter allows more: seconds, `L`, `W`, `#`, `?`, macros) and the daylight-saving rules:
a local time that does not exist is skipped, a local time that occurs twice fires at its first
occurrence only.
"""

from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta
from functools import cache
from zoneinfo import ZoneInfo, available_timezones

from croniter import CroniterBadDateError, croniter

INVALID = "Schedule must be daily, weekly, monthly or a 5-field cron expression"
NO_UPCOMING_RUN = "Schedule has no upcoming run"
NAMED = {"daily": "0 0 * * *", "weekly": "0 0 * * 1", "monthly": "0 0 1 * *"}
HORIZON = timedelta(days=5 * 366)  # "fires at least once within 5 years" (EXT a.1)

MONTHS = ["jan", "feb", "mar", "apr", "may", "jun", "jul", "aug", "sep", "oct", "nov", "dec"]
DAYS = ["sun", "mon", "tue", "wed", "thu", "fri", "sat"]
# (low, high, names mapped to their values) per field, in expression order.
FIELDS: list[tuple[int, int, dict[str, int]]] = [
    (0, 59, {}),
    (0, 23, {}),
    (1, 31, {}),
    (1, 12, {name: i + 1 for i, name in enumerate(MONTHS)}),
    (0, 7, {name: i for i, name in enumerate(DAYS)}),
]
ITEM = re.compile(r"(?P<range>\*|[0-9a-z]+(?:-[0-9a-z]+)?)(?:/(?P<step>[0-9]+))?")


def normalise(schedule: str) -> str:
    """The stored form: trimmed, internal whitespace runs collapsed to one space."""
    return " ".join(schedule.split())


def is_valid(schedule: str) -> bool:
    """Whether a normalised schedule is a named schedule or an accepted 5-field expression."""
    if schedule in NAMED:
        return True
    parts = schedule.lower().split(" ")
    return len(parts) == 5 and all(
        _valid_field(part, *spec) for part, spec in zip(parts, FIELDS, strict=True)
    )


def _valid_field(text: str, low: int, high: int, names: dict[str, int]) -> bool:
    for item in text.split(","):
        match = ITEM.fullmatch(item)
        if match is None:
            return False
        bounds = match["range"]
        step = match["step"]
        if step is not None and (int(step) < 1 or (bounds != "*" and "-" not in bounds)):
            return False  # `n/step` is not in the accepted syntax, only `*/n` and `a-b/n`
        if bounds == "*":
            continue
        values = [_value(part, low, high, names) for part in bounds.split("-")]
        if None in values or (len(values) == 2 and values[0] > values[1]):  # type: ignore[operator]
            return False
    return True


def _value(text: str, low: int, high: int, names: dict[str, int]) -> int | None:
    value = names.get(text) if not text.isdigit() else int(text)
    return value if value is not None and low <= value <= high else None


@cache
def known_timezones() -> frozenset[str]:
    """IANA names, exact case (EXT a.2)."""
    return frozenset(available_timezones())


def expression(schedule: str) -> str:
    """The 5-field expression of a valid normalised schedule, in lower case for croniter."""
    return NAMED.get(schedule, schedule).lower()


def next_run(schedule: str, timezone: str, after: datetime) -> datetime | None:
    """The first run strictly after `after` (aware), in UTC; None when there is none within
    5 years. `schedule` must be valid and `timezone` known."""
    zone = ZoneInfo(timezone)
    start = after.astimezone(zone)
    local_start = start.replace(tzinfo=None)
    limit = local_start + HORIZON
    times = croniter(expression(schedule), local_start)
    while True:
        try:
            candidate: datetime = times.get_next(datetime)
        except CroniterBadDateError:
            return None
        if candidate > limit:
            return None
        # fold=0 is the first occurrence of a repeated local time.
        instant = candidate.replace(tzinfo=zone, fold=0).astimezone(UTC)
        if instant.astimezone(zone).replace(tzinfo=None) != candidate:
            continue  # in a daylight-saving gap: this local time does not exist that day
        if instant > after:
            return instant
