"""Gateway settings, defined once: the limits on a request and the security of the public port, each
with its flags (the gateway's, and ``serve``'s, which passes them on). Standard library only, so that
``serve`` (argparse and process management) stays light; security.py applies the security settings,
validation.py the limits.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Self


def flag(name: str) -> str:
    """A setting's command-line flag: its field name in dashes."""
    return "--" + name.replace("_", "-")


class FlagGroup:
    """A frozen dataclass of gateway settings whose flags are named after its fields: read back from parsed
    arguments, and written as a gateway's command line (``serve`` passes them on), by name, so a new
    setting is its field, its flag and its use."""

    __slots__ = ()

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> Self:
        return cls(**{f.name: getattr(args, f.name) for f in fields(cls)})

    def to_argv(self) -> list[str]:
        """The gateway flags that parse back to these settings (unset ones left out)."""
        values = ((f.name, getattr(self, f.name)) for f in fields(self))
        return [a for name, value in values if value is not None for a in (flag(name), str(value))]

    @classmethod
    def add_number_flags(cls, parser: argparse.ArgumentParser | argparse._ArgumentGroup, helps: dict[str, str]) -> None:
        """A flag for each numeric field named in ``helps``, of the field's type, with its default."""
        defaults = cls()
        for name, help_text in helps.items():
            default = getattr(defaults, name)
            real = isinstance(default, float)
            parser.add_argument(flag(name), dest=name, type=type(default), default=default,
                                metavar="S" if real else "N",
                                help=f"{help_text} (default {f'{default:g}' if real else default})")


@dataclass(frozen=True, slots=True)
class GatewayLimits(FlagGroup):
    """Bounds on one request that hold before any work is done on it (the gateway's flags)."""

    max_request_bytes: int = 4 * 2**20  # a larger message is refused by gRPC itself (RESOURCE_EXHAUSTED)
    max_prompt_bytes: int = 2**20  # a longer text prompt (or Tokenize text) is refused before tokenizing
    max_stop_strings: int = 16
    max_stop_string_chars: int = 256
    max_stop_token_ids: int = 64
    tokenizer_threads: int = 2  # long texts are tokenized in these threads, off the event loop
    max_queued_tokenizations: int = 64  # beyond it: RESOURCE_EXHAUSTED with a retry hint

    def __post_init__(self) -> None:
        for name in self.__dataclass_fields__:
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")


_LIMIT_HELP = {
    "max_request_bytes": "largest request message in bytes; gRPC refuses a larger one with RESOURCE_EXHAUSTED",
    "max_prompt_bytes": "longest text prompt (and Tokenize text) in UTF-8 bytes, checked before tokenizing; "
    "prompts that cannot fit the context are refused earlier still",
    "max_stop_strings": "most stop strings per request",
    "max_stop_string_chars": "longest stop string in characters",
    "max_stop_token_ids": "most stop token ids per request",
    "tokenizer_threads": "threads that tokenize long texts off the event loop",
    "max_queued_tokenizations": "long texts waiting for a tokenizer thread at most; beyond it requests get "
    "RESOURCE_EXHAUSTED",
}


def add_limit_arguments(parser: argparse.ArgumentParser | argparse._ArgumentGroup) -> None:
    """The GatewayLimits flags (the gateway's, and ``serve``'s which passes them on)."""
    GatewayLimits.add_number_flags(parser, _LIMIT_HELP)


DEFAULT_LIMITS = GatewayLimits()


@dataclass(frozen=True, slots=True)
class SecurityConfig(FlagGroup):
    """TLS, mutual TLS and the bearer token of the public port, and the plaintext health port; all
    off by default (see security.py)."""

    tls_cert: str | None = None
    tls_key: str | None = None
    tls_client_ca: str | None = None
    auth_token_file: str | None = None
    health_port: int | None = None

    def __post_init__(self) -> None:
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ValueError("--tls-cert and --tls-key go together")
        if self.tls_client_ca and not self.tls_cert:
            raise ValueError("--tls-client-ca (mutual TLS) needs --tls-cert and --tls-key")
        for name in ("tls_cert", "tls_key", "tls_client_ca", "auth_token_file"):
            path = getattr(self, name)
            if path is not None and not Path(path).is_file():
                raise ValueError(f"{flag(name)}: {path} is not a readable file")
        if self.auth_token_file is not None and not read_token(self.auth_token_file):
            raise ValueError(f"--auth-token-file: {self.auth_token_file} is empty")

    @property
    def tls(self) -> bool:
        return self.tls_cert is not None


def read_token(path: str) -> str:
    return Path(path).read_text().strip()


def add_security_arguments(parser: argparse.ArgumentParser | argparse._ArgumentGroup) -> None:
    """The security flags (the gateway's, and ``serve``'s, which passes them on)."""
    parser.add_argument("--tls-cert", metavar="PEM", help="serve TLS with this certificate (chain); needs --tls-key")
    parser.add_argument("--tls-key", metavar="PEM", help="the private key of --tls-cert")
    parser.add_argument("--tls-client-ca", metavar="PEM",
                        help="mutual TLS: require client certificates signed by this CA")
    parser.add_argument("--auth-token-file", metavar="FILE",
                        help="require 'authorization: Bearer TOKEN' on every call but health checks; TOKEN is "
                        "the file's content")
    parser.add_argument("--health-port", type=int, metavar="PORT",
                        help="also serve grpc.health.v1 (only) in plaintext on this port, for probes that "
                        "cannot speak TLS; 0 picks a free one")


DEFAULT_KEEPALIVE_S = 10.0
# The scheduler permits a ping every 0.5 s without data (service.MIN_PING_INTERVAL_MS): keepalives of at
# least twice that never count as a ping strike, however the timers jitter.
MIN_KEEPALIVE_S = 1.0


def add_keepalive_argument(parser: argparse.ArgumentParser | argparse._ArgumentGroup) -> None:
    """The gateway's keepalive toward its schedulers (the gateway's flag, and ``serve``'s)."""
    parser.add_argument("--scheduler-keepalive", type=float, default=DEFAULT_KEEPALIVE_S, metavar="SECONDS",
                        help="ping each scheduler's Connect stream this often, also while idle, to notice an "
                        f"engine whose host vanished; at least {MIN_KEEPALIVE_S:g} (default %(default)s)")
