"""Runners: claim queued builds and execute them with a driver."""
