"""The secure demo overlay's patches (TLS, bearer token, plaintext health port) agrees with the gateway's
parser and with itself: the flags parse, the files they name lie in the mounted Secrets, readiness asks
the health port, and the Service no longer claims cleartext HTTP/2."""

import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

K8S = Path(__file__).resolve().parents[2] / "k8s"

pytestmark = pytest.mark.slow  # runs kubectl


def render(overlay: str) -> list[dict]:
    if shutil.which("kubectl") is None:
        pytest.skip("kubectl not found")
    out = subprocess.run(["kubectl", "kustomize", str(K8S / "overlays" / overlay)], capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 0, out.stderr
    return [d for d in yaml.safe_load_all(out.stdout) if d]


def test_the_secure_demo_mounts_the_secrets_its_flags_name():
    from scheduler_svc.gateway import server
    from scheduler_svc.gateway.options import SecurityConfig

    docs = render("cpu-demo-secure")
    env = next(d for d in docs if d["kind"] == "ConfigMap")["data"]
    gateway = next(d for d in docs if d["kind"] == "Deployment" and d["metadata"]["name"] == "pagedserve-gateway")
    pod = gateway["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    args = server.build_parser().parse_args([re.sub(r"\$\((\w+)\)", lambda m: env[m.group(1)], a)
                                             for a in container["args"]])
    secrets = {v["name"]: v["secret"]["secretName"] for v in pod["volumes"] if "secret" in v}
    mounts = {m["mountPath"]: secrets[m["name"]] for m in container["volumeMounts"] if m["name"] in secrets}
    assert set(mounts.values()) == {"pagedserve-gateway-tls", "pagedserve-gateway-token"}
    # Each file lies in the Secret that holds it, under the key kubectl gives it.
    assert mounts[str(Path(args.tls_cert).parent)] == "pagedserve-gateway-tls" and args.tls_cert.endswith("/tls.crt")
    assert mounts[str(Path(args.tls_key).parent)] == "pagedserve-gateway-tls" and args.tls_key.endswith("/tls.key")
    assert mounts[str(Path(args.auth_token_file).parent)] == "pagedserve-gateway-token"
    assert container["readinessProbe"]["grpc"]["port"] == args.health_port
    assert {"name": "health", "containerPort": args.health_port} in container["ports"]
    assert args.port == next(p["containerPort"] for p in container["ports"] if p["name"] == "grpc")
    with pytest.raises(ValueError, match="is not a readable file"):  # the files exist only in the pod
        SecurityConfig.from_args(args)
    service = next(d for d in docs if d["kind"] == "Service" and d["metadata"]["name"] == "pagedserve")
    assert "appProtocol" not in service["spec"]["ports"][0]
