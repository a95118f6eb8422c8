"""A newcomer's mistakes at start-up are one line, never a traceback: --device cuda without a GPU, a Hugging
Face Hub id (or any missing path) as --model, a port in use, a bad dtype or device string, a log directory
that cannot be made, a checkpoint the worker cannot serve. And the ways out are quiet: a worker that hears
SIGTERM while it exits prints no atexit traceback, Ctrl-C while the model loads stops at once, announcing
no drain."""

import os
import signal
import socket
import subprocess
import sys
import threading

import pytest
import torch

from tests.factories import make_checkpoint
from tests.protos.proto_helpers import REPO
from tests.waiting import wait_until

pytestmark = pytest.mark.slow  # each case starts the command as a process

HUB_ID = "HuggingFaceTB/SmolLM2-135M"
ENV = dict(os.environ, PYTHONPATH=str(REPO))
no_gpu = pytest.mark.skipif(torch.cuda.is_available(), reason="needs a host without a CUDA GPU")


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("ckpt") / "demo")


def pagedserve(*argv: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "scheduler_svc.cli", *argv], capture_output=True, text=True,
                          timeout=timeout, cwd=REPO, env=ENV, stdin=subprocess.DEVNULL)


def one_line_error(proc: subprocess.CompletedProcess, *needles: str) -> str:
    """The command failed with exactly one line on stderr, no traceback, holding every needle."""
    assert proc.returncode != 0, proc.stdout
    assert "Traceback" not in proc.stderr + proc.stdout, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, proc.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


def offline(model, *argv: str) -> list[str]:
    return ["offline", "--model", str(model), "--prompt", "Hello", "--max-tokens", "2", *argv]


def serve(model, *argv: str) -> list[str]:
    return ["serve", "--model", str(model), "--port", "0", "--gateways", "1", *argv]


@no_gpu
@pytest.mark.parametrize("command", [serve, offline])
def test_device_cuda_without_a_gpu_is_one_line(checkpoint, command):
    err = one_line_error(pagedserve(*command(checkpoint, "--device", "cuda")), "--device cuda", "use --device cpu")
    assert "CPU-only" in err or "no CUDA GPU" in err


@pytest.mark.parametrize("command", [serve, offline])
def test_a_hub_id_as_model_says_what_model_takes(command):
    one_line_error(pagedserve(*command(HUB_ID)), f"{HUB_ID} does not exist", "Hugging Face Hub id",
                   f"hf download {HUB_ID}", "config.json", ".gguf", "nothing is downloaded")


def test_bad_settings_are_one_line(checkpoint):
    one_line_error(pagedserve(*serve(checkpoint, "--dtype", "float8")), "dtype must be one of")
    one_line_error(pagedserve(*offline(checkpoint, "--device", "cuda:x")), "device must be cpu, cuda or cuda:N")


def test_a_port_in_use_and_an_impossible_log_dir_are_one_line(checkpoint, tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = str(taken.getsockname()[1])
        one_line_error(pagedserve("serve", "--model", str(checkpoint), "--host", "127.0.0.1", "--port", port),
                       f"cannot listen on 127.0.0.1:{port}", "Address already in use")
        one_line_error(pagedserve(*serve(checkpoint, "--host", "127.0.0.1", "--http-port", port)),
                       f"cannot listen on 127.0.0.1:{port}")
    (tmp_path / "file").write_text("")
    one_line_error(pagedserve(*serve(checkpoint, "--log-dir", str(tmp_path / "file" / "logs"))), "pagedserve serve:")


def test_a_checkpoint_the_worker_cannot_load_fails_without_a_traceback(tmp_path):
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "config.json").write_text('{"architectures": ["NoSuchForCausalLM"]}')
    proc = pagedserve(*offline(bad))
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert "unsupported architecture ['NoSuchForCausalLM']" in proc.stderr


def test_sigterm_while_the_worker_exits_prints_nothing(tmp_path):
    """The launcher SIGTERMs the group while the worker, told to shut down, runs its atexit callbacks:
    the handler must not raise SystemExit there ("Exception ignored in atexit callback")."""
    code = (
        "import atexit, os, signal, sys, time\n"
        "from gpu_worker import worker\n"
        "worker.serve = lambda config: 0  # served until Shutdown\n"
        "atexit.register(lambda: (os.kill(os.getpid(), signal.SIGTERM), time.sleep(0.5)))\n"
        f"sys.exit(worker.main(['--model', {str(tmp_path)!r}, '--scheduler', 'ipc://{tmp_path}/w.sock']))\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=REPO,
                          env=ENV)
    assert (proc.returncode, proc.stderr) == (0, "")


def test_ctrl_c_while_the_model_loads_stops_without_draining(checkpoint):
    """SIGINT as soon as the processes are started (the worker is still importing torch and loading): the
    launcher stops everything without announcing a drain of streams that never ran, exit 0, and the
    scheduler does not wait for a worker hello it will never need (it once held the stop ~10 s)."""
    proc = subprocess.Popen([sys.executable, "-m", "scheduler_svc.cli", *serve(checkpoint)], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, cwd=REPO, env=ENV)
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(proc.stdout), daemon=True)
    reader.start()
    wait_until(lambda: any('"event": "started ' in line for line in lines), 120,
               what="the processes to start")
    assert not any("ready: serving" in line for line in lines)
    proc.send_signal(signal.SIGINT)
    assert proc.wait(60) == 0
    reader.join(10)
    out = "".join(lines)
    assert "interrupted before the service was ready" in out and "draining:" not in out, out
    assert "Traceback" not in out and "Exception ignored" not in out, out


@pytest.mark.parametrize("device, gpus, visible, refused", [
    ("cuda", 2, 2, False), ("cuda", 3, 2, True),  # bare cuda: engines x ranks numbered from cuda:0
    ("cuda:1", 4, 2, False), ("cuda:2", 1, 2, True),  # cuda:N: every rank on GPU N
    ("cpu", 8, 0, False),
])
def test_device_check_counts_the_gpus_the_launchers_use(monkeypatch, device, gpus, visible, refused):
    from gpu_worker.engine_args import check_device_present

    monkeypatch.setattr(torch.cuda, "is_available", lambda: visible > 0)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: visible)
    if refused:
        with pytest.raises(ValueError, match=f"--device {device}: needs .* but PyTorch sees {visible}"):
            check_device_present(device, gpus)
    else:
        check_device_present(device, gpus)
