"""The scheduler: creates builds for due cron jobs."""
