"""Structured logs for every process of the service (structlog): gateway, scheduler, worker, launcher.

One line per event, to stderr: JSON when stderr is not a terminal (containers, files, CI), coloured
key=value when it is. Every line carries ``component`` (gateway, scheduler, worker, launcher); lines
about a request carry ``request_id`` because the code logs them through ``log.bind(request_id=...)``.
It lives at the bottom of the house (structlog and the standard library only) because every role uses
it, the worker included, which must not import the scheduler side.

    from gpu_worker import log
    log.configure("gateway")
    logger = log.get_logger()
    logger.info("request finished", request_id="r1", prompt_tokens=5)
"""

from __future__ import annotations

import logging
import sys
from typing import Any

import structlog

FORMATS = ("auto", "json", "console")


def configure(component: str, level: str = "info", fmt: str = "auto") -> None:
    """Sets up structlog for this process; ``fmt`` is auto (JSON unless stderr is a tty), json or console."""
    if fmt not in FORMATS:
        raise ValueError(f"log format must be one of {', '.join(FORMATS)}, got {fmt!r}")
    level_no = logging.getLevelName(level.upper())
    if not isinstance(level_no, int):
        raise ValueError(f"unknown log level {level!r}")
    as_json = fmt == "json" or (fmt == "auto" and not sys.stderr.isatty())

    def add_component(_logger: Any, _method: str, event: dict) -> dict:
        event.setdefault("component", component)
        return event

    processors: list = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        add_component,
        structlog.processors.StackInfoRenderer(),
    ]
    if as_json:
        processors += [structlog.processors.dict_tracebacks, structlog.processors.JSONRenderer()]
    else:
        processors.append(structlog.dev.ConsoleRenderer())
    structlog.configure(
        processors=processors,
        wrapper_class=structlog.make_filtering_bound_logger(level_no),
        logger_factory=structlog.WriteLoggerFactory(file=sys.stderr),
        cache_logger_on_first_use=True,
    )


def get_logger(**initial_values: Any) -> Any:
    return structlog.get_logger(**initial_values)


def add_arguments(p) -> None:
    """The logging flags every process role takes."""
    p.add_argument("--log-level", default="info", help="debug, info, warning or error (default info)")
    p.add_argument("--log-format", default="auto", choices=FORMATS,
                   help="auto: JSON unless stderr is a terminal (default auto)")


def describe_exception(exc: BaseException) -> str:
    """An exception as one readable line for a client: its type and message, without the errno tuple
    that some carry as their arguments (OverflowError(34, 'Numerical result out of range'))."""
    args = exc.args
    if len(args) == 2 and isinstance(args[0], int) and isinstance(args[1], str):
        detail = args[1]
    else:
        detail = str(exc)
    return f"{type(exc).__name__}: {detail}" if detail else type(exc).__name__
