"""The HTTP port's own bounds (--http-port): how long a connection may take to send a request's head and
body, how long it may sit idle between requests, how many connections may be open at once, and how many
sequences one /v1/completions request may start (prompts x n). Standard library only, like options.py,
so that ``serve`` can take and pass on these flags without importing aiohttp; http_limits.py applies
them. The body's size bound is the gRPC port's (``--max-request-bytes``), so the two ports agree.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass

from scheduler_svc.gateway.options import FlagGroup, flag


@dataclass(frozen=True, slots=True)
class HttpLimits(FlagGroup):
    """Bounds of the HTTP port (the gateway's flags; ``serve`` passes them on)."""

    http_header_timeout: float = 10.0  # from a connection's first byte of a request to its last header line
    http_body_timeout: float = 30.0  # from the request's head to its body's last byte
    http_idle_timeout: float = 60.0  # a keep-alive connection waiting for its next request (and a new one)
    max_http_connections: int = 1024  # open connections of one gateway process; beyond: 503 and closed
    max_sequences_per_request: int = 128  # prompts x n of one /v1/completions request; beyond: 400
    sequences_in_flight_per_request: int = 32  # a request's prompts run this many sequences at a time

    def __post_init__(self) -> None:
        for name in self.__dataclass_fields__:
            if not getattr(self, name) > 0:
                raise ValueError(f"{flag(name)} must be positive, got {getattr(self, name)}")


_HELP = {
    "http_header_timeout": "seconds a connection gets to send a request's line and headers, from the request's "
    "first byte (or from connecting); then it is closed",
    "http_body_timeout": "seconds a request gets to send its whole body after its headers; then 408",
    "http_idle_timeout": "seconds a keep-alive connection may wait for its next request; then it is closed",
    "max_http_connections": "open HTTP connections per gateway process at most; more are answered 503 and closed",
    "max_sequences_per_request": "sequences one /v1/completions request may start (prompts x n) at most; more "
    "get 400",
    "sequences_in_flight_per_request": "a multi-prompt /v1/completions request runs this many sequences at a time "
    "(at least n), so that other clients' requests interleave with its prompts",
}


def add_http_arguments(parser: argparse.ArgumentParser | argparse._ArgumentGroup) -> None:
    HttpLimits.add_number_flags(parser, _HELP)
