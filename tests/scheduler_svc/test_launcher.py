"""The launchers' command lines: each child's arguments parse with its role's own parser back to the
engine settings they were written from, and every child ends with its launcher."""

from dataclasses import replace

from gpu_worker import worker
from gpu_worker.engine_args import EngineArgs
from scheduler_svc import service
from scheduler_svc.launcher import engine_commands


def test_engine_commands_parse_back_with_the_role_parsers():
    engine = EngineArgs(model="/m", device="cuda", block_size=8, max_num_batched_tokens=512, max_model_len=900,
                        enable_prefix_caching=False, tensor_parallel_size=2, kv_cache_memory="1GiB", seed=3)
    commands = dict(engine_commands(engine, "unix:///tmp/s.sock", "ipc:///tmp/w.sock"))
    assert list(commands) == ["scheduler", "worker0", "worker1"]
    parsers = {"scheduler": service.build_parser(), "worker": worker.build_parser()}
    for name, command in commands.items():
        role = command[3]
        assert command[1:3] == ["-m", "scheduler_svc.cli"] and command[-1] == "--exit-with-parent"
        args = parsers[role].parse_args(command[4:])
        assert args.exit_with_parent
        if role == "scheduler":
            assert (args.listen, args.workers) == ("unix:///tmp/s.sock", "ipc:///tmp/w.sock")
            assert service.config_from_args(args) == service.SchedulerConfig.from_engine_args(engine)
            continue
        rank = int(name.removeprefix("worker"))
        want = worker.WorkerConfig.from_engine_args(replace(engine, device=f"cuda:{rank}"), "ipc:///tmp/w.sock", rank)
        assert worker.config_from_args(args) == want


def test_one_rank_keeps_the_device_name():
    _, (name, command) = engine_commands(EngineArgs(model="/m", device="cuda"), "a", "b")
    assert name == "worker" and command[command.index("--device") + 1] == "cuda"
