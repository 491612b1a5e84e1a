"""Schedules and time zones (docs/api.md §17)."""

from datetime import UTC, datetime

import pytest

from marid import schedules
from marid.schedules import next_run

NOW = datetime(2024, 3, 1, 12, 0, tzinfo=UTC)  # EXT a.3: a Friday


def utc(*args: int) -> datetime:
    return datetime(*args, tzinfo=UTC)


@pytest.mark.parametrize(
    ("schedule", "timezone", "expected"),
    [
        ("daily", "UTC", utc(2024, 3, 2)),
        ("weekly", "UTC", utc(2024, 3, 4)),
        ("monthly", "UTC", utc(2024, 4, 1)),
        ("30 2 * * 1-5", "UTC", utc(2024, 3, 4, 2, 30)),
        ("daily", "Europe/Berlin", utc(2024, 3, 1, 23)),
        ("0 9 1 * *", "America/New_York", utc(2024, 3, 1, 14)),
    ],
)
def test_examples_table(schedule, timezone, expected):
    assert next_run(schedule, timezone, NOW) == expected


def test_next_run_is_strictly_after_the_reference_time():
    assert next_run("daily", "UTC", utc(2024, 3, 2)) == utc(2024, 3, 3)


def test_a_local_time_in_the_spring_gap_is_skipped_in_berlin():
    # 2024-03-31: 02:00 CET jumps to 03:00 CEST, so 02:30 does not exist that day.
    after = utc(2024, 3, 30, 12)
    assert next_run("30 2 * * *", "Europe/Berlin", after) == utc(2024, 4, 1, 0, 30)


def test_a_local_time_in_the_spring_gap_is_skipped_in_new_york():
    # 2024-03-10: 02:00 EST jumps to 03:00 EDT.
    after = utc(2024, 3, 9, 12)
    assert next_run("30 2 * * *", "America/New_York", after) == utc(2024, 3, 11, 6, 30)


def test_a_repeated_local_time_fires_once_at_its_first_occurrence_in_berlin():
    # 2024-10-27: 03:00 CEST goes back to 02:00 CET; 02:30 happens at 00:30Z and 01:30Z.
    first = next_run("30 2 * * *", "Europe/Berlin", utc(2024, 10, 26, 12))
    assert first == utc(2024, 10, 27, 0, 30)
    assert next_run("30 2 * * *", "Europe/Berlin", first) == utc(2024, 10, 28, 1, 30)


def test_a_repeated_local_time_fires_once_in_new_york():
    # 2024-11-03: 02:00 EDT goes back to 01:00 EST; 01:30 happens at 05:30Z and 06:30Z.
    first = next_run("30 1 * * *", "America/New_York", utc(2024, 11, 2, 12))
    assert first == utc(2024, 11, 3, 5, 30)
    assert next_run("30 1 * * *", "America/New_York", first) == utc(2024, 11, 4, 6, 30)
    # Every 15 minutes through the repeated hour: each local time once.
    runs = [utc(2024, 11, 3, 5)]
    for _ in range(8):
        nxt = next_run("*/15 1 * * *", "America/New_York", runs[-1])
        assert nxt is not None
        runs.append(nxt)
    assert runs[1:4] == [utc(2024, 11, 3, 5, 15), utc(2024, 11, 3, 5, 30), utc(2024, 11, 3, 5, 45)]
    assert runs[4] == utc(2024, 11, 4, 6)


def test_a_schedule_that_never_fires_has_no_next_run():
    assert next_run("0 0 31 2 *", "UTC", NOW) is None
    assert next_run("0 0 30 2 *", "Europe/Berlin", NOW) is None


def test_february_29_is_within_five_years():
    assert next_run("0 0 29 2 *", "UTC", NOW) == utc(2028, 2, 29)


def test_day_of_month_or_day_of_week_when_both_are_restricted():
    # The 31st of February never exists, but Mondays in February do.
    assert next_run("0 0 31 2 mon", "UTC", NOW) == utc(2025, 2, 3)
    assert next_run("0 0 15 * 0", "UTC", NOW) == utc(2024, 3, 3)


def test_sunday_is_0_or_7_and_names_are_case_insensitive():
    assert next_run("0 0 * * 7", "UTC", NOW) == utc(2024, 3, 3)
    assert next_run("0 0 * * Sun", "UTC", NOW) == utc(2024, 3, 3)
    assert next_run("0 0 * * MON-fri", "UTC", NOW) == utc(2024, 3, 4)
    assert next_run("0 0 1 jUn *", "UTC", NOW) == utc(2024, 6, 1)


def test_normalise_trims_and_collapses_whitespace():
    assert schedules.normalise("  30\t2  *   * \n 1-5 ") == "30 2 * * 1-5"


@pytest.mark.parametrize(
    "schedule",
    [
        "0 0 * * * *",  # seconds or year field
        "0 0 * *",
        "@daily",
        "0 0 ? * *",
        "0 0 L * *",
        "0 0 15W * *",
        "0 0 * * 1#2",
        "0 0 * * 5L",
        "60 0 * * *",
        "0 24 * * *",
        "0 0 0 * *",
        "0 0 32 * *",
        "0 0 * 13 *",
        "0 0 * * 8",
        "5/10 * * * *",
        "*/0 * * * *",
        "10-5 * * * *",
        "0 0 * * foo",
        "0 0 * mon *",
        "Daily",
        "hourly",
        "",
        "0,,5 * * * *",
        "- * * * *",
    ],
)
def test_rejected_syntax(schedule):
    assert not schedules.is_valid(schedules.normalise(schedule))


@pytest.mark.parametrize(
    "schedule",
    [
        "daily",
        "weekly",
        "monthly",
        "* * * * *",
        "*/5 * * * *",
        "0-30/10 1,2,3 1-15 JAN-mar,12 mon-fri",
        "0 0 * * 0-7/2",
        "59 23 31 12 7",
    ],
)
def test_accepted_syntax(schedule):
    assert schedules.is_valid(schedule)
    assert next_run(schedule, "UTC", NOW) is not None
