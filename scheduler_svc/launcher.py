"""Starting and supervising the service's processes (scheduler, workers, gateway).

Children run ``python -m scheduler_svc.cli <role> ...`` with the checkout on PYTHONPATH, exactly as
Kubernetes runs each role in its own container, plus ``--exit-with-parent``: a launcher that dies takes
its children with it.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

from gpu_worker.engine_args import EngineArgs

REPO_ROOT = Path(__file__).resolve().parent.parent


def child_env() -> dict[str, str]:
    env = dict(os.environ)
    parts = [str(REPO_ROOT)] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
    env["PYTHONPATH"] = os.pathsep.join(dict.fromkeys(parts))
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    env["PYTHONUNBUFFERED"] = "1"
    return env


def cli_command(role: str, *args: str) -> list[str]:
    """A child process of ``role``; it ends when the launching process does (--exit-with-parent)."""
    return [sys.executable, "-m", "scheduler_svc.cli", role, *args, "--exit-with-parent"]


def engine_commands(engine: EngineArgs, scheduler_address: str, worker_address: str, index: int | None = None,
                    scheduler_args: Sequence[str] = ()) -> list[tuple[str, list[str]]]:
    """(name, command) of the scheduler and of every worker rank, all from one set of engine settings.
    With several ranks on ``cuda``, rank r takes ``cuda:r``. ``index``: engine i of several on this host,
    named scheduler{i}, worker{i} (worker{i}_{r} per rank); on ``cuda`` it takes GPUs i*N .. i*N+N-1 of
    its N ranks. ``scheduler_args``: more scheduler flags (its name, metrics labels)."""
    world = engine.tensor_parallel_size
    tag = "" if index is None else str(index)
    first_gpu = (index or 0) * world
    commands = [(f"scheduler{tag}", cli_command("scheduler", "--listen", scheduler_address, "--workers", worker_address,
                                                *scheduler_args, *engine.to_argv("scheduler")))]
    for rank in range(world):
        numbered = engine.device == "cuda" and (world > 1 or index is not None)
        device = f"cuda:{first_gpu + rank}" if numbered else engine.device
        name = f"worker{tag}_{rank}" if tag and world > 1 else f"worker{rank}" if world > 1 else f"worker{tag}"
        commands.append((name, cli_command(
            "worker", "--scheduler", worker_address, "--rank", str(rank),
            *replace(engine, device=device).to_argv("worker"),
        )))
    return commands


@dataclass(slots=True)
class Child:
    name: str
    popen: subprocess.Popen
    log_path: Path | None
    argv: list[str]
    stage: int = 0  # stop order: lower stages are stopped (and waited for) first


def stop_stage(name: str) -> int:
    """The gateways first (no new requests), then the schedulers (they end what runs, as shutting down),
    then the workers: a worker that left first would read as a failure to its scheduler. Children are
    named by role (gateway0, scheduler1, worker1_0, ...)."""
    return 0 if name.startswith("gateway") else 1 if name.startswith("scheduler") else 2



class ProcessGroup:
    """Children that live and die together: if one exits, the owner stops the rest."""

    def __init__(self, log_dir: Path | None = None, env: dict[str, str] | None = None) -> None:
        self.log_dir = log_dir
        self.env = env or {}  # set for every child, on top of child_env()
        self.children: list[Child] = []

    def start(self, name: str, argv: list[str], stage: int | None = None) -> Child:
        """Starts a child; ``stage`` (default: by its name, see stop_stage) orders stop()."""
        log_path = None
        out = None
        if self.log_dir is not None:
            log_path = self.log_dir / f"{name}.log"
            out = open(log_path, "ab")  # noqa: SIM115 - the child owns it
        popen = subprocess.Popen(
            argv, env=child_env() | self.env, stdout=out, stderr=subprocess.STDOUT if out else None,
            stdin=subprocess.DEVNULL, start_new_session=True,
        )
        if out is not None:
            out.close()
        child = Child(name, popen, log_path, argv, stop_stage(name) if stage is None else stage)
        self.children.append(child)
        return child

    def restart(self, child: Child, argv: list[str] | None = None) -> Child:
        """Starts ``child``'s command (or ``argv``) again in its place (its log file is appended to)."""
        index = next(i for i, c in enumerate(self.children) if c is child)
        new = self.start(child.name, argv or child.argv)
        self.children.pop()
        self.children[index] = new
        return new

    def first_dead(self) -> Child | None:
        """A child that has exited. When several have, one killed by a signal comes first: the others
        most likely exited because of it (a scheduler exits when its worker is killed)."""
        dead = [c for c in self.children if c.popen.poll() is not None]
        return min(dead, key=lambda c: c.popen.returncode >= 0) if dead else None

    def log_tail(self, child: Child, num_lines: int = 30) -> str:
        if child.log_path is None or not child.log_path.exists():
            return ""
        return "\n".join(child.log_path.read_text(errors="replace").splitlines()[-num_lines:])

    def stop(self, timeout_s: float = 10.0) -> None:
        """SIGTERM the children stage by stage (stop_stage), each stage given ``timeout_s`` to exit before
        SIGKILL."""
        self.stop_children(self.children, timeout_s)

    def stop_children(self, children: Sequence[Child], timeout_s: float = 10.0) -> None:
        for stage in sorted({c.stage for c in children}):
            deadline = time.monotonic() + timeout_s
            group = [c for c in children if c.stage == stage]
            for c in group:
                if c.popen.poll() is None:
                    c.popen.send_signal(signal.SIGTERM)
                    # A stopped child (SIGSTOP, a stalled worker) acts on its SIGTERM only once continued.
                    c.popen.send_signal(signal.SIGCONT)
            for c in group:
                try:
                    c.popen.wait(max(0.0, deadline - time.monotonic()))
                except subprocess.TimeoutExpired:
                    c.popen.kill()
                    c.popen.wait()

    def remove(self, children: Sequence[Child]) -> None:
        """Forgets stopped children (an engine about to be started again)."""
        self.children = [c for c in self.children if c not in children]
