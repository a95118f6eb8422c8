"""Where the serving path's CPU time goes: per-process CPU share and sampled Python stacks.

``bench serving --profile-dir DIR`` wraps the timed region with ``ProcessProfile``: for every process
of the service (gateway(s), scheduler, worker(s)) and the benchmark client itself it reads the CPU
time the kernel accounts to it (``/proc/PID/stat``, all threads) at the start and the end, and, when
``py-spy`` is on the PATH, samples each one's Python stacks (``py-spy record --format raw``; Python
frames only, idle threads left out). The summary per process: CPU seconds, share of one core, and
the functions holding most of its samples (self and inclusive).

Linux only (/proc). Sampling costs the sampled process little (py-spy reads its memory from outside)
but takes CPU of its own: on a machine with few cores, profile in a run apart from the figures.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

_CLK_TCK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
ROLES = ("gateway", "scheduler", "worker")


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a process (all its threads) so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / _CLK_TCK  # utime, stime (fields 14, 15 of stat)


def _children(pid: int) -> list[int]:
    """Every descendant of ``pid`` (from /proc/*/stat parent links)."""
    parents: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            parents.setdefault(ppid, []).append(int(entry.name))
    out, todo = [], [pid]
    while todo:
        for child in parents.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


def service_processes(launcher_pid: int) -> dict[str, int]:
    """The role processes under a ``pagedserve serve`` launcher, named gateway0, scheduler0, worker0..."""
    named: dict[str, int] = {}
    counts: Counter = Counter()
    for pid in sorted(_children(launcher_pid)):
        try:
            argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        role = next((a.decode() for a in argv if a.decode() in ROLES), None)
        if role is not None:
            named[f"{role}{counts[role]}"] = pid
            counts[role] += 1
    return named


@dataclass
class ProcessProfile:
    """CPU accounting (and py-spy samples) for named processes over one region of time."""

    processes: dict[str, int]
    out_dir: Path
    rate_hz: int = 100
    sample: bool = True  # False: CPU accounting only, no py-spy
    _cpu0: dict[str, float] = field(default_factory=dict)
    _t0: float = 0.0
    _spies: dict[str, subprocess.Popen] = field(default_factory=dict)

    def start(self) -> None:
        spy = shutil.which("py-spy") if self.sample else None
        if spy is not None:
            self.out_dir.mkdir(parents=True, exist_ok=True)
        for name, pid in self.processes.items():
            self._cpu0[name] = cpu_seconds(pid)
            if spy is not None:
                self._spies[name] = subprocess.Popen(
                    [spy, "record", "--pid", str(pid), "--format", "raw", "--rate", str(self.rate_hz),
                     "--duration", "3600", "--nonblocking",  # stopped by SIGINT in stop()
                     "--output", str(self.out_dir / f"{name}.txt")],
                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                )
        self._t0 = time.perf_counter()

    def stop(self) -> dict[str, dict]:
        wall = time.perf_counter() - self._t0
        report: dict[str, dict] = {}
        for name, pid in self.processes.items():
            try:
                cpu = cpu_seconds(pid) - self._cpu0[name]
            except OSError:
                cpu = float("nan")
            report[name] = {"pid": pid, "cpu_s": cpu, "cores": cpu / wall if wall else 0.0}
        for name, proc in self._spies.items():
            proc.send_signal(signal.SIGINT)  # py-spy writes what it sampled and exits
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()
            stacks = self.out_dir / f"{name}.txt"
            if stacks.exists():
                report[name]["top_self"], report[name]["top_inclusive"] = top_functions(stacks)
        report["_wall_s"] = {"wall_s": wall}
        return report


def top_functions(stacks_file: Path, k: int = 12) -> tuple[list, list]:
    """From py-spy's raw (collapsed) stacks: [(share, function)] by self samples and by inclusive ones."""
    self_count: Counter = Counter()
    incl_count: Counter = Counter()
    total = 0
    for line in stacks_file.read_text(errors="replace").splitlines():
        stack, _, count = line.rpartition(" ")
        if not count.isdigit():
            continue
        n = int(count)
        frames = [_short(f) for f in stack.split(";") if f]
        if not frames:
            continue
        total += n
        self_count[frames[-1]] += n
        for f in set(frames):
            incl_count[f] += n
    if not total:
        return [], []
    return ([(round(c / total, 3), f) for f, c in self_count.most_common(k)],
            [(round(c / total, 3), f) for f, c in incl_count.most_common(k)])


# Where a gateway's samples go, by the innermost frame that names a stage (checked innermost first).
GATEWAY_STAGES: dict[str, tuple[str, ...]] = {
    "detokenization": ("IncrementalDetokenizer.", "Tokenizer.decode", "DecodeStream"),
    "tokenization and validation": ("validate", "Tokenizer.encode", "GenerationCore.tokenize"),
    "text, stop checks, responses": ("SampleStream.", "StopStrings.", "GenerationCore."),
    "gRPC writes to clients (encode, send)": ("GenerationServicer.", "_ServicerContext"),
    "scheduler link (events in, submits out)": ("SchedulerLink.", "RequestInbox.", "_channel.py",
                                                "consume_request_iterator", "channel_spin", "queues.py"),
}
# What no stage above claims: the loop itself, and gRPC's completion-queue thread of grpc.aio.
EVENT_LOOP = ("event loop and gRPC completions", ("events.py", "base_events.py", "selectors.py",
                                                  "selector_events.py", "threading.py"))


def stage_shares(stacks_file: Path, stages: dict[str, tuple[str, ...]],
                 fallback: tuple[str, tuple[str, ...]] = EVENT_LOOP) -> dict[str, float]:
    """Share of samples per stage: a sample belongs to the stage of its innermost frame that contains
    one of the stage's markers (the stages' order breaks ties within a frame); failing that, to the
    ``fallback`` stage if a frame carries its markers, else to "other"."""
    counts: Counter = Counter()
    for line in stacks_file.read_text(errors="replace").splitlines():
        stack, _, count = line.rpartition(" ")
        if not count.isdigit():
            continue
        frames = [f for f in reversed(stack.split(";")) if f]  # innermost first
        stage = next((name for f in frames for name, marks in stages.items() if any(m in f for m in marks)), None)
        if stage is None:
            stage = fallback[0] if any(m in f for f in frames for m in fallback[1]) else "other"
        counts[stage] += int(count)
    total = sum(counts.values())
    names = [*stages, fallback[0], "other"]
    return {name: counts[name] / total for name in names if counts[name]} if total else {}


def _short(frame: str) -> str:
    """'fn (path/to/module.py:123)' -> 'fn (module.py)'; threads' idle frames stay recognisable."""
    name, _, where = frame.partition(" (")
    return f"{name} ({Path(where.split(':')[0]).name})" if where else name


def format_report(report: dict[str, dict]) -> str:
    wall = report.get("_wall_s", {}).get("wall_s", 0.0)
    lines = [f"CPU by process over the timed region ({wall:.2f} s):"]
    for name, r in report.items():
        if name.startswith("_"):
            continue
        lines.append(f"  {name:<11} {r['cpu_s']:7.2f} CPU s  {r['cores']:5.2f} cores")
        for share, fn in r.get("top_self", [])[:8]:
            lines.append(f"      self {100 * share:5.1f}%  {fn}")
    return "\n".join(lines)
