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

import hmac
from pathlib import Path

import grpc

from scheduler_svc.gateway.options import SecurityConfig, read_token

OPEN_METHOD_PREFIXES = ("/grpc.health.v1.Health/",)  # answered without a token


def server_credentials(config: SecurityConfig) -> grpc.ServerCredentials:
    key, cert = Path(config.tls_key).read_bytes(), Path(config.tls_cert).read_bytes()
    client_ca = Path(config.tls_client_ca).read_bytes() if config.tls_client_ca else None
    return grpc.ssl_server_credentials([(key, cert)], root_certificates=client_ca,
                                       require_client_auth=client_ca is not None)


def http_ssl_context(config: SecurityConfig):
    """The same TLS (and client-certificate check) for the OpenAI-compatible HTTP port; None without TLS."""
    if not config.tls:
        return None
    import ssl

    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(config.tls_cert, config.tls_key)
    if config.tls_client_ca:
        context.load_verify_locations(config.tls_client_ca)
        context.verify_mode = ssl.CERT_REQUIRED
    return context


def bearer_matches(given: str | bytes, token: bytes) -> bool:
    """Whether an authorization value carries ``token`` in the Bearer scheme. The scheme's name is
    case-insensitive (RFC 7235 section 2.1: "bearer", "BEARER" too); the token is compared in constant
    time."""
    given = given.encode() if isinstance(given, str) else given
    scheme, _, credentials = given.strip().partition(b" ")
    return scheme.lower() == b"bearer" and hmac.compare_digest(credentials.strip(), token)


def interceptors(config: SecurityConfig) -> list[grpc.aio.ServerInterceptor]:
    return [TokenInterceptor(read_token(config.auth_token_file))] if config.auth_token_file else []


class TokenInterceptor(grpc.aio.ServerInterceptor):
    """Ends calls without the bearer token with UNAUTHENTICATED, before their request is read."""

    def __init__(self, token: str) -> None:
        self._token = token.encode()

    async def intercept_service(self, continuation, handler_call_details):
        handler = await continuation(handler_call_details)
        if handler is None or handler_call_details.method.startswith(OPEN_METHOD_PREFIXES):
            return handler  # unknown methods stay UNIMPLEMENTED
        given = next((v for k, v in handler_call_details.invocation_metadata or () if k == "authorization"), None)
        if given is None:
            return _refusal(handler, "missing credentials: send 'authorization: Bearer <token>'")
        if not bearer_matches(given, self._token):
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
