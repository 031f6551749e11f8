"""Node logs an operator can use: one line per event naming the node, or
JSON lines (``--log-format json``) for log shippers.

The twistd plugins call ``install`` from their option parsing, which runs
before twistd starts logging: it hands twistd an observer factory (twistd's
own ``--logger`` hook) that writes where ``--logfile`` says, in the chosen
format, with the node's name on every event. Python ``logging`` records
(the I/O-free Raft core logs through it) are bridged into the same log, so
elections and leader changes appear beside everything else.
"""

from __future__ import annotations

import json
import logging
import sys
from collections.abc import Callable
from typing import IO, Any

from twisted.logger import (
    FileLogObserver,
    ILogObserver,
    Logger,
    LogLevel,
    eventAsJSON,
    formatEvent,
    formatTime,
)
from twisted.python import logfile

__all__ = ["FORMATS", "configured_observer", "install", "observer"]

FORMATS = ("text", "json")

_LEVELS = {
    logging.DEBUG: LogLevel.debug,
    logging.INFO: LogLevel.info,
    logging.WARNING: LogLevel.warn,
    logging.ERROR: LogLevel.error,
    logging.CRITICAL: LogLevel.critical,
}


def text_line(node: str) -> Callable[[dict[str, Any]], str | None]:
    """``2026-12-06T07:18:00+0000 group-1-0 info surfshard.x: message``."""

    def format(event: dict[str, Any]) -> str | None:
        text = formatEvent(event)
        if "log_failure" in event:
            text = f"{text}\n{event['log_failure'].getTraceback()}".strip()
        if not text:
            return None
        level = event.get("log_level")
        namespace = event.get("log_namespace", "-")
        when = formatTime(event.get("log_time"))
        return f"{when} {node} {level.name if level else '-'} {namespace}: {text.replace(chr(10), chr(10) + chr(9))}\n"

    return format


def json_line(node: str) -> Callable[[dict[str, Any]], str | None]:
    """One JSON object per line, with ``node``, ``level``, ``namespace``,
    ``time`` and the formatted ``message`` beside Twisted's own fields."""

    def format(event: dict[str, Any]) -> str | None:
        text = formatEvent(event)
        level = event.get("log_level")
        extra = {
            "node": node,
            "level": level.name if level else None,
            "namespace": event.get("log_namespace"),
            "time": event.get("log_time"),
            "message": text,
        }
        try:
            record = json.loads(eventAsJSON(event))
        except Exception:
            record = {}
        record.update(extra)
        return json.dumps(record, default=repr) + "\n"

    return format


def observer(node: str, log_format: str, out: IO[str]) -> ILogObserver:
    formatter = json_line(node) if log_format == "json" else text_line(node)
    return FileLogObserver(out, formatter)


class _ToTwisted(logging.Handler):
    """Python ``logging`` records into Twisted's log."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            Logger(namespace=record.name).emit(
                _LEVELS.get(record.levelno, LogLevel.info), "{msg}", msg=record.getMessage()
            )
        except Exception:  # pragma: no cover - logging must never raise
            self.handleError(record)


def bridge_stdlib_logging() -> None:
    root = logging.getLogger()
    if not any(isinstance(h, _ToTwisted) for h in root.handlers):
        root.addHandler(_ToTwisted())
    for name in ("raft", "surfshard", "shardmaster"):
        logging.getLogger(name).setLevel(logging.INFO)


#: What ``configured_observer`` makes: (node name, format, log file path).
_settings: tuple[str, str, str | None] = ("-", "text", None)


def configured_observer() -> ILogObserver:
    """The observer factory ``install`` names to twistd (``--logger`` takes
    a dotted name, resolved after every option is parsed)."""
    node, log_format, path = _settings
    if not path or path == "-":
        out: IO[str] = sys.stdout
    else:
        out = logfile.LogFile.fromFullPath(path)  # type: ignore[assignment]
    return observer(node, log_format, out)


def install(parent: Any, node: str, log_format: str) -> None:
    """Make twistd (whose options are ``parent``) log as this module says."""
    global _settings
    bridge_stdlib_logging()
    if parent is None:
        return
    _settings = (node, log_format, parent.get("logfile"))
    parent["logger"] = f"{__name__}.configured_observer"
