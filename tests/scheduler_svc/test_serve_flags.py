"""serve's public addresses and the flags it passes on: the HTTP API announced as https with TLS, the
HTTP port's limits reaching every gateway, and /metrics on loopback unless --metrics-host says otherwise."""

import argparse
import socket
import urllib.request

from scheduler_svc import metrics, serve, service
from scheduler_svc.gateway import server as gateway_server
from scheduler_svc.gateway.http_options import HttpLimits


def serve_args(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    serve.add_arguments(parser)
    return parser.parse_args(["--model", "m", *argv])


def test_http_api_is_announced_with_its_scheme(tmp_path):
    assert serve.http_api_url(serve_args(), 8000) == "http://0.0.0.0:8000/v1"
    tls = serve_args("--tls-cert", "c.pem", "--tls-key", "k.pem", "--host", "::1")
    assert serve.http_api_url(tls, 8443) == "https://[::1]:8443/v1"


def test_http_limits_reach_the_gateways(tmp_path):
    args = serve_args("--http-port", "0", "--http-header-timeout", "2.5", "--max-http-connections", "7",
                      "--max-sequences-per-request", "9")
    argv = serve._gateway_argv(args, "unix:/x", tmp_path / "http.port")
    parsed = gateway_server.build_parser().parse_args(argv)
    assert HttpLimits.from_args(parsed) == HttpLimits(http_header_timeout=2.5, max_http_connections=7,
                                                      max_sequences_per_request=9)


def test_metrics_listen_on_loopback_unless_asked():
    gateway_args = gateway_server.build_parser().parse_args(["--model", "m", "--scheduler", "x:1"])
    scheduler_args = service.build_parser().parse_args([])
    assert serve_args().metrics_host == gateway_args.metrics_host == scheduler_args.metrics_host == "127.0.0.1"
    assert serve_args("--metrics-host", "0.0.0.0").metrics_host == "0.0.0.0"
    port = metrics.serve_metrics(0)
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as resp:
        assert resp.status == 200
    # Bound to 127.0.0.1: the same port on another local address (127.0.0.2 is loopback too, but not
    # the bound one) refuses the connection.
    with socket.socket() as sock:
        sock.settimeout(5)
        assert sock.connect_ex(("127.0.0.2", port)) != 0
