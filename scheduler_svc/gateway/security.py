"""Optional security of the gateway's public port: TLS, mutual TLS, and bearer-token authentication.

- TLS: ``--tls-cert`` and ``--tls-key`` (PEM files) make the port speak TLS only.
- mTLS: with ``--tls-client-ca`` as well, a client must present a certificate signed by that CA.
- Token: with ``--auth-token-file``, every call must carry ``authorization: Bearer <token>`` (the file's
  content, stripped) or it ends UNAUTHENTICATED before its request is even read. The token is read
  from a file, not a flag, so that it never shows in a process list (Kubernetes mounts a Secret).
  grpc.health.v1 stays open, so load balancers and probes need no credentials.
- ``--health-port``: a second, plaintext port serving grpc.health.v1 only, for probes that cannot
  speak TLS (Kubernetes' native gRPC probe, the ``serve`` launcher).

Nothing here is on by default; the gateway logs a warning when it listens beyond loopback without TLS
or a token. The scheduler's and workers' sockets are internal: unix/ipc sockets under ``serve``,
loopback by default otherwise.
"""

from __future__ import annotations

import argparse
import hmac
from dataclasses import dataclass
from pathlib import Path

import grpc

OPEN_METHOD_PREFIXES = ("/grpc.health.v1.Health/",)  # answered without a token


@dataclass(frozen=True, slots=True)
class SecurityConfig:
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
                raise ValueError(f"--{name.replace('_', '-')}: {path} is not a readable file")
        if self.auth_token_file is not None and not read_token(self.auth_token_file):
            raise ValueError(f"--auth-token-file: {self.auth_token_file} is empty")

    @property
    def tls(self) -> bool:
        return self.tls_cert is not None

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> SecurityConfig:
        return cls(args.tls_cert, args.tls_key, args.tls_client_ca, args.auth_token_file, args.health_port)

    def to_argv(self) -> list[str]:
        """The gateway flags for these settings."""
        argv: list[str] = []
        for name in self.__dataclass_fields__:
            value = getattr(self, name)
            if value is not None:
                argv += [f"--{name.replace('_', '-')}", str(value)]
        return argv

    def server_credentials(self) -> grpc.ServerCredentials:
        key, cert = Path(self.tls_key).read_bytes(), Path(self.tls_cert).read_bytes()
        client_ca = Path(self.tls_client_ca).read_bytes() if self.tls_client_ca else None
        return grpc.ssl_server_credentials([(key, cert)], root_certificates=client_ca,
                                           require_client_auth=client_ca is not None)

    def interceptors(self) -> list[grpc.aio.ServerInterceptor]:
        return [TokenInterceptor(read_token(self.auth_token_file))] if self.auth_token_file else []


def read_token(path: str) -> str:
    return Path(path).read_text().strip()


def add_arguments(parser: argparse.ArgumentParser | argparse._ArgumentGroup) -> None:
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


class TokenInterceptor(grpc.aio.ServerInterceptor):
    """Ends calls without the bearer token with UNAUTHENTICATED, before their request is read."""

    def __init__(self, token: str) -> None:
        self._expected = f"Bearer {token}".encode()

    async def intercept_service(self, continuation, handler_call_details):
        handler = await continuation(handler_call_details)
        if handler is None or handler_call_details.method.startswith(OPEN_METHOD_PREFIXES):
            return handler  # unknown methods stay UNIMPLEMENTED
        given = next((v for k, v in handler_call_details.invocation_metadata or () if k == "authorization"), None)
        if given is None:
            return _refusal(handler, "missing credentials: send 'authorization: Bearer <token>'")
        given = given.encode() if isinstance(given, str) else given
        if not hmac.compare_digest(given, self._expected):
            return _refusal(handler, "invalid credentials")
        return handler


def _refusal(handler: grpc.RpcMethodHandler, message: str) -> grpc.RpcMethodHandler:
    """A handler of the same shape as ``handler`` that ends the call UNAUTHENTICATED. Without a
    deserializer: the request, if one was read, stays bytes and is never parsed."""

    async def refuse(request, context):
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, message)

    make = {
        (False, False): grpc.unary_unary_rpc_method_handler,
        (False, True): grpc.unary_stream_rpc_method_handler,
        (True, False): grpc.stream_unary_rpc_method_handler,
        (True, True): grpc.stream_stream_rpc_method_handler,
    }[(handler.request_streaming, handler.response_streaming)]
    return make(refuse)
