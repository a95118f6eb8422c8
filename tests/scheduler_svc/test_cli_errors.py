"""Ordinary mistakes on the command line end in one line and a non-zero exit, never a traceback; and
``serve`` finds a taken port before it starts any process."""

import socket

import pytest

from scheduler_svc import cli, serve
from tests.factories import make_checkpoint


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return str(make_checkpoint(tmp_path_factory.mktemp("ckpt") / "demo"))


def run_cli(argv: list[str], capsys) -> tuple[int, str]:
    try:
        code = cli.main(argv)
    except SystemExit as exc:  # argparse and SystemExit(message) end this way
        if isinstance(exc.code, str):
            print(exc.code, file=__import__("sys").stderr)
            code = 1
        else:
            code = exc.code
    out = capsys.readouterr()
    return code, out.err + out.out


@pytest.mark.parametrize("argv, code, message", [
    (["generate", "--prompt", "hi", "--max-tokens", "-3"], 2,
     "pagedserve generate: error: argument --max-tokens: must be an integer in [0, 2**32), got -3"),
    (["generate", "--prompt", "hi", "--max-tokens", "3", "--top-k", "-1"], 2,
     "pagedserve generate: error: argument --top-k: must be an integer in [0, 2**32), got -1"),
    (["generate", "--prompt", "hi", "--max-tokens", "3", "--seed", "-1"], 2,
     "pagedserve generate: error: argument --seed: must be a seed in [0, 2**63), got -1"),
    (["generate", "--prompt", "hi", "--max-tokens", "3", "--seed", str(2**63)], 2,
     "argument --seed: must be a seed in [0, 2**63)"),
    (["generate", "--prompt", "hi", "--max-tokens", "three"], 2, "argument --max-tokens: not an integer: 'three'"),
    (["generate", "--prompt", "hi", "--max-tokens", "3", "--logprobs", "-1"], 2, "argument --logprobs"),
    (["generate", "--prompt", "hi"], 2, "the following arguments are required: --max-tokens"),
    (["generate", "--prompt", "hi", "--max-tokens", "3", "--target", "127.0.0.1:1", "--timeout", "5"], 1,
     "pagedserve generate: UNAVAILABLE: "),
    (["generate", "--prompt", "hi", "--max-tokens", "3", "--tls-ca", "/no/such.pem"], 1,
     "pagedserve generate: [Errno 2] No such file or directory: '/no/such.pem'"),
    (["offline", "--model", "{model}", "--prompt", "hi", "--max-tokens", "3", "--n", "2", "--beam-width", "2"], 2,
     "pagedserve offline: error: n: must be 1 with beam search"),
    (["offline", "--model", "{model}", "--prompt", "hi", "--max-tokens", "-3"], 2,
     "pagedserve offline: error: argument --max-tokens: must be an integer in [0, 2**32), got -3"),
    (["offline", "--model", "{model}", "--prompt", "hi", "--max-tokens", "0"], 2,
     "pagedserve offline: error: max_tokens: must be an integer >= 1, got 0"),
    (["offline", "--model", "{model}", "--prompt", "hi", "--max-tokens", "3", "--seed", "-1"], 2,
     "pagedserve offline: error: argument --seed: must be a seed in [0, 2**63), got -1"),
    (["offline", "--model", "{model}", "--prompt", "hi", "--max-tokens", "3", "--top-p", "0"], 2,
     "pagedserve offline: error: top_p: must be in (0, 1], got 0.0"),
    (["serve", "--model", "{model}", "--port", "99999"], 1, "pagedserve serve: cannot listen on 0.0.0.0:99999"),
    (["serve", "--model", "{model}", "--tls-cert", "/no/cert.pem", "--tls-key", "/no/key.pem"], 1,
     "pagedserve serve: --tls-cert: /no/cert.pem is not a readable file"),
    (["serve", "--model", "{model}", "--tls-client-ca", "{model}/config.json"], 1,
     "pagedserve serve: --tls-client-ca (mutual TLS) needs --tls-cert and --tls-key"),
    (["serve", "--model", "{model}", "--max-request-bytes", "0"], 1, "max_request_bytes must be at least 1, got 0"),
    (["serve", "--model", "{model}", "--step-timeout", "-1"], 1, "step_timeout must be >= 0"),
    (["serve", "--model", "/no/model"], 1, "pagedserve serve: "),
    (["bogus"], 2, "pagedserve: error: argument COMMAND: invalid choice: 'bogus'"),
])
def test_a_mistake_is_one_line_and_an_exit_code(argv, code, message, model, capsys):
    got_code, output = run_cli([a.format(model=model) for a in argv], capsys)
    assert got_code == code
    lines = output.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], output
    assert "Traceback" not in output


def test_serve_finds_a_taken_port_before_starting_anything(model, capsys):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        code, output = run_cli(["serve", "--model", model, "--host", "127.0.0.1", "--port", str(port)], capsys)
    assert code == 1
    assert output.strip() == f"pagedserve serve: cannot listen on 127.0.0.1:{port}: Address already in use"
    assert "started" not in output  # no child was started


def test_a_free_port_passes_the_check():
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    serve.check_port_free("127.0.0.1", port)
    serve.check_port_free("127.0.0.1", 0)
