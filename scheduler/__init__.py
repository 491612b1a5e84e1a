"""The scheduler: creates builds for due cron jobs and delivers webhooks."""
