"""``pagedserve serve`` as a child process, read from what its launcher prints: the gateway's address,
the children's pids and the scheduler's private address. ``bench soak`` and the end-to-end tests
drive a service through it, and read the pool's state (GetEngineInfo) and the processes' memory."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


class LocalService:
    """A `pagedserve serve` launcher on loopback (port 0) and what it printed."""

    def __init__(self, model: str | Path, *extra: str, log_dir: str | Path | None = None,
                 start_timeout_s: float = 180.0) -> None:
        self.log_dir = Path(log_dir) if log_dir is not None else None
        self.lines: list[str] = []
        argv = [sys.executable, "-m", "scheduler_svc.cli", "serve", "--model", str(model), "--host", "127.0.0.1",
                "--port", "0", *extra]
        if self.log_dir is not None:
            argv += ["--log-dir", str(self.log_dir)]
        env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
        self.proc = subprocess.Popen(argv, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                     env=env)
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        try:
            self.target = "127.0.0.1:" + self.wait_for(r"gateway listening on 127\.0\.0\.1:(\d+)", start_timeout_s)
            started = self.wait_for(r"started (.*)", start_timeout_s)
            self.pids = {name: int(pid) for name, pid in re.findall(r"(\w+) \(pid (\d+)\)", started)}
            self.scheduler_address = self.wait_for(r"scheduler on (unix://\S+),", start_timeout_s)
            self.wait_for(r"(ready): serving", start_timeout_s)
        except BaseException:
            self.stop()
            raise

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.lines.append(line.rstrip("\n"))

    def wait_for(self, pattern: str, timeout_s: float = 180.0) -> str:
        """The first group of the first line the launcher printed that matches ``pattern``."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            exited = self.proc.poll() is not None
            if exited:
                self._reader.join(10)  # it ends at EOF: every line the launcher printed is in self.lines
            for line in list(self.lines):
                m = re.search(pattern, line)
                if m:
                    return m.group(1)
            if exited:
                break
            time.sleep(0.05)
        raise AssertionError(f"no {pattern!r} from the launcher:\n" + "\n".join(self.lines) + self.logs())

    def logs(self, tail_chars: int = 3000) -> str:
        if self.log_dir is None:
            return ""
        return "".join(f"\n--- {p.name}\n{p.read_text(errors='replace')[-tail_chars:]}"
                       for p in sorted(self.log_dir.glob("*.log")))

    def http_port(self, timeout_s: float = 60.0) -> int:
        """The OpenAI-compatible HTTP API's port (a service started with --http-port)."""
        return int(self.wait_for(r"OpenAI-compatible HTTP API on https?://\S+:(\d+)/v1", timeout_s))

    def engine_info(self, timeout_s: float = 10.0):
        import grpc

        import clients  # noqa: F401
        from pagedserve.internal.v1 import scheduler_pb2, scheduler_pb2_grpc

        with grpc.insecure_channel(self.scheduler_address) as channel:
            stub = scheduler_pb2_grpc.SchedulerServiceStub(channel)
            return stub.GetEngineInfo(scheduler_pb2.GetEngineInfoRequest(), timeout=timeout_s)

    def settled_engine_info(self, timeout_s: float = 15.0):
        """The EngineInfo once every KV block is free and no request is left, or the last one seen after
        ``timeout_s``."""
        deadline = time.monotonic() + timeout_s
        while True:
            info = self.engine_info()
            if (info.stats.num_free_blocks == info.num_blocks and info.stats.num_requests == 0) \
                    or time.monotonic() > deadline:
                return info
            time.sleep(0.05)

    def wait_all_blocks_free(self, timeout_s: float = 15.0):
        """The EngineInfo once every KV block is free and no request is left; AssertionError if never."""
        info = self.settled_engine_info(timeout_s)
        if info.stats.num_free_blocks != info.num_blocks or info.stats.num_requests:
            raise AssertionError(f"blocks still held after {timeout_s:g} s: {info.stats}")
        return info

    def rss_bytes(self, name: str) -> int:
        """Resident memory of child ``name`` (gateway, scheduler, worker), from /proc."""
        status = Path(f"/proc/{self.pids[name]}/status").read_text()
        return int(re.search(r"VmRSS:\s+(\d+) kB", status).group(1)) * 1024

    def stop(self, timeout_s: float = 90.0) -> int:
        """SIGTERM (drain), then the launcher's exit code; SIGKILL after ``timeout_s``, once the launcher
        has printed where each of its threads was (SIGUSR1, into ``lines``)."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            self.lines.append(f"--- the launcher did not exit {timeout_s:g} s after SIGTERM; its threads:")
            self.proc.send_signal(signal.SIGUSR1)
            time.sleep(2.0)
            self.proc.kill()
            code = self.proc.wait()
            self._reader.join(10)
            return code
