"""Moved to ``surfshard.leader`` (groups need it too); kept as an alias."""

from surfshard.leader import RETRYABLE, Backoff, LeaderCaller

__all__ = ["RETRYABLE", "Backoff", "LeaderCaller"]
