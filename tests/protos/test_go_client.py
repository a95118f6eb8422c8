"""The Go stubs and the example client build in GOPATH mode against Debian's Go packages, and the
client streams a completion from a GenerationService (a fake one here, in this process)."""

import json
import subprocess
from concurrent import futures

import grpc
import pytest
from proto_helpers import REPO, go_env, require_go

import clients  # noqa: F401  (puts clients/python, where the stubs live, on sys.path)

# isort: split
from pagedserve.v1 import generation_pb2, generation_pb2_grpc

pytestmark = pytest.mark.slow  # go build, and the client runs as a process

CLIENT = "pagedserve/cmd/pagedserve-generate"


class FakeGeneration(generation_pb2_grpc.GenerationServiceServicer):
    """Streams a fixed completion in three deltas and keeps the requests it saw."""

    def __init__(self):
        self.requests: list[generation_pb2.GenerateRequest | generation_pb2.ChatRequest] = []

    def Chat(self, request, context):
        return self.Generate(request, context)

    def Generate(self, request, context):
        self.requests.append(request)
        if request.sampling_params.max_tokens == 0:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "max_tokens must be at least 1")
        for text in ("Hello", ", paged", " world"):
            yield generation_pb2.GenerateResponse(request_id="r", text=text)
        yield generation_pb2.GenerateResponse(
            request_id="r", finish_reason=generation_pb2.FINISH_REASON_LENGTH
        )


@pytest.fixture(scope="module")
def client_binary(tmp_path_factory):
    """Builds and vets the stubs and the client; returns the client's path."""
    require_go()
    tmp = tmp_path_factory.mktemp("go")
    env = go_env(tmp)
    binary = tmp / "pagedserve-generate"
    for cmd in (["go", "build", "pagedserve/..."], ["go", "vet", "pagedserve/..."],
                ["go", "build", "-o", str(binary), CLIENT]):
        proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
        assert proc.returncode == 0, f"{' '.join(cmd)} failed:\n{proc.stdout}{proc.stderr}"
    return binary


@pytest.fixture
def server():
    servicer = FakeGeneration()
    srv = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    generation_pb2_grpc.add_GenerationServiceServicer_to_server(servicer, srv)
    port = srv.add_insecure_port("127.0.0.1:0")
    srv.start()
    yield f"127.0.0.1:{port}", servicer
    srv.stop(grace=None)


def run_client(binary, *args):
    return subprocess.run([str(binary), *args], capture_output=True, text=True, timeout=60)


def test_go_build_and_vet(client_binary):
    assert client_binary.is_file()


def _version(v: str) -> tuple[int, ...]:
    return tuple(int(x) for x in v.lstrip("v").split("-")[0].split("."))


def test_go_mod_covers_what_the_code_imports(client_binary, tmp_path):
    """Module mode for users (go.mod; `go mod tidy` fetches and writes go.sum, which needs the network, so
    CI reads the file offline): the module path is the stubs' go_package root, and it requires every
    module the code imports, at versions no older than the Debian ones the GOPATH build above proves."""
    module_dir = REPO / "clients" / "go" / "src" / "pagedserve"
    env = dict(go_env(tmp_path), GO111MODULE="on", GOPROXY="off", GOFLAGS="-mod=mod")
    mod = json.loads(subprocess.run(["go", "mod", "edit", "-json"], cwd=module_dir, env=env, capture_output=True,
                                    text=True, check=True).stdout)
    assert mod["Module"]["Path"] == "pagedserve" and _version(mod["Go"]) <= (1, 19)
    listed = subprocess.run(["go", "list", "-f", '{{join .Imports "\\n"}}', "pagedserve/..."], cwd=REPO,
                            env=go_env(tmp_path), capture_output=True, text=True, check=True).stdout.split()
    imported = {"/".join(p.split("/")[:2]) for p in listed if "." in p.split("/")[0]}
    required = {r["Path"]: r["Version"] for r in mod["Require"]}
    assert imported == set(required), (imported, required)
    debian = {"google.golang.org/grpc": (1, 33, 3), "google.golang.org/protobuf": (1, 28, 1)}
    assert all(_version(required[m]) >= v for m, v in debian.items()), required


def test_client_prints_streamed_text(client_binary, server):
    target, servicer = server
    proc = run_client(client_binary, "-target", target, "-prompt", "Hi", "-max-tokens", "3",
                      "-temperature", "0", "-seed", "7")
    assert (proc.returncode, proc.stdout, proc.stderr) == (0, "Hello, paged world\n", "")
    params = servicer.requests[0].sampling_params
    assert servicer.requests[0].text == "Hi"
    assert (params.max_tokens, params.HasField("temperature"), params.temperature) == (3, True, 0.0)
    assert (params.HasField("seed"), params.seed) == (True, 7)


def test_client_leaves_unset_params_to_the_server(client_binary, server):
    target, servicer = server
    assert run_client(client_binary, "-target", target, "-max-tokens", "2").returncode == 0
    params = servicer.requests[0].sampling_params
    assert not params.HasField("temperature") and not params.HasField("seed")


def test_client_exits_nonzero_with_the_status(client_binary, server):
    target, _ = server
    proc = run_client(client_binary, "-target", target, "-max-tokens", "0")
    assert proc.returncode == 1
    assert proc.stdout == ""
    assert proc.stderr == "pagedserve-generate: InvalidArgument: max_tokens must be at least 1\n"


class FakeWithLogprobs(generation_pb2_grpc.GenerationServiceServicer):
    """Streams two tokens with their logprobs (and top_logprobs alternatives when asked), only to a
    caller that sends the bearer token; keeps the requests and their metadata."""

    def __init__(self):
        self.calls: list[tuple[generation_pb2.GenerateRequest, dict]] = []

    def Generate(self, request, context):
        metadata = dict(context.invocation_metadata())
        self.calls.append((request, metadata))
        if metadata.get("authorization") != "Bearer tok3n":
            context.abort(grpc.StatusCode.UNAUTHENTICATED, "invalid credentials")
        k = request.sampling_params.top_logprobs
        for token_id, text in ((5, "Hi"), (6, " there")):
            lp = generation_pb2.TokenLogprob(token_id=token_id, logprob=-0.25 * token_id)
            for i in range(k):
                lp.top.add(token_id=token_id + i, logprob=-0.25 * token_id - i)
            yield generation_pb2.GenerateResponse(request_id="r", token_ids=[token_id], text=text, logprobs=[lp])
        yield generation_pb2.GenerateResponse(request_id="r", finish_reason=generation_pb2.FINISH_REASON_LENGTH)


@pytest.fixture(params=["plaintext", "tls"])
def secured_server(request, tmp_path):
    from tests.certs import make_ca, make_cert

    servicer = FakeWithLogprobs()
    srv = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    generation_pb2_grpc.add_GenerationServiceServicer_to_server(servicer, srv)
    flags = []
    if request.param == "tls":
        ca = make_ca(tmp_path / "ca")
        cert = make_cert(tmp_path / "server", ca, "server")
        creds = grpc.ssl_server_credentials([(cert.key.read_bytes(), cert.cert.read_bytes())])
        port = srv.add_secure_port("127.0.0.1:0", creds)
        flags = ["-tls-ca", str(ca.cert)]
    else:
        port = srv.add_insecure_port("127.0.0.1:0")
    srv.start()
    token = tmp_path / "token"
    token.write_text("tok3n\n")
    yield f"localhost:{port}", servicer, flags, token
    srv.stop(grace=None)


def test_client_sends_the_token_and_prints_logprobs(client_binary, secured_server):
    target, servicer, flags, token = secured_server
    proc = run_client(client_binary, "-target", target, "-max-tokens", "2", "-logprobs", "2",
                      "-token-file", str(token), *flags)
    assert (proc.returncode, proc.stderr) == (0, "")
    assert proc.stdout == ("Hi there\n"
                           "token 5: -1.2500  top: 5:-1.2500  6:-2.2500\n"
                           "token 6: -1.5000  top: 6:-1.5000  7:-2.5000\n")
    request, metadata = servicer.calls[0]
    assert (request.sampling_params.logprobs, request.sampling_params.top_logprobs) == (True, 2)
    assert metadata["authorization"] == "Bearer tok3n"


def test_client_without_the_token_is_refused(client_binary, secured_server):
    target, servicer, flags, _ = secured_server
    proc = run_client(client_binary, "-target", target, "-max-tokens", "2", *flags)
    assert proc.returncode == 1
    assert proc.stderr == "pagedserve-generate: Unauthenticated: invalid credentials\n"
    assert not servicer.calls[0][0].sampling_params.logprobs  # not asked: not sent
def test_client_chat_sends_the_messages(client_binary, server):
    target, servicer = server
    proc = run_client(client_binary, "-target", target, "-chat", "-system", "Be brief.", "-prompt", "Hi",
                      "-max-tokens", "3")
    assert (proc.returncode, proc.stdout, proc.stderr) == (0, "Hello, paged world\n", "")
    (request,) = servicer.requests
    assert isinstance(request, generation_pb2.ChatRequest)
    assert [(m.role, m.content) for m in request.messages] == [("system", "Be brief."), ("user", "Hi")]
    assert request.sampling_params.max_tokens == 3
    run_client(client_binary, "-target", target, "-chat", "-prompt", "Yo", "-max-tokens", "3")
    assert [(m.role, m.content) for m in servicer.requests[1].messages] == [("user", "Yo")]
