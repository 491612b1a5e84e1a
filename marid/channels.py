"""The LISTEN/NOTIFY channel names, in one place (docs/architecture.md §4).

NOTIFY is delivered when the sending transaction commits, to connections listening then;
every listener also polls, so a missed notification costs latency, never correctness.
Every NOTIFY and LISTEN names its channel through these constants; a test keeps any other
spelling out of the source.
"""

from __future__ import annotations

# Queued builds to claim. Payload: the driver name, `recovered`, `freed` or `released`. Sent on
# submission, by lease recovery, and by triggers (migration 0020) when a build stops running
# while others are queued, an image download finishes or a namespace's limit is raised; every
# runner listens.
BUILDS = "marid_builds"
# Stop this running build now. Payload: the build id. Sent by a kill; every runner listens.
KILL = "marid_kill"
# A job has new output or has finished. Payload: the job id. Sent by runners; every API
# process listens for its live-output readers (docs/api.md §19).
OUTPUT = "marid_output"
# Something that decides who may read a build changed (a namespace's visibility, a collaborator
# removed, a token deleted...). Payload: empty. Sent by triggers (migration 0017); every API
# process listens and re-checks the readers of its live outputs (docs/api.md §19).
ACCESS = "marid_access"
# Webhook deliveries are queued. Payload: empty. Every scheduler's deliverer listens.
HOOKS = "marid_hooks"
# A cron job's next_run was written. Payload: the new next_run (ISO 8601). Every scheduler's
# cron loop listens, so that a cron fires on time the first time.
CRONS = "marid_crons"
