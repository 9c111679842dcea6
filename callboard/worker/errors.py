"""Typed failures of a worker's start-up, for the CLI to map to exit codes."""

from __future__ import annotations


class WorkerStartError(Exception):
    """The worker could not start (its HTTP port is taken, the job executor failed to boot).

    The message is one line that says what to fix; details are in the log."""


class ConnectionGiveUp(Exception):
    """The server could not be reached (or refused us) within the retry budget."""
