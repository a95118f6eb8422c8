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


def test_several_engines_take_their_own_gpus_and_names():
    engine = EngineArgs(model="/m", device="cuda", tensor_parallel_size=2)
    commands = dict(engine_commands(engine, "unix:///tmp/e1.sock", "ipc:///tmp/e1-w.sock", index=1,
                                    scheduler_args=["--engine-name", "engine1", "--model-name", "m"]))
    assert list(commands) == ["scheduler1", "worker1_0", "worker1_1"]
    args = service.build_parser().parse_args(commands["scheduler1"][4:])
    assert (args.engine_name, args.model_name, args.listen) == ("engine1", "m", "unix:///tmp/e1.sock")
    for rank in range(2):
        command = commands[f"worker1_{rank}"]
        assert command[command.index("--device") + 1] == f"cuda:{2 + rank}"
    (_, _), (name, command) = engine_commands(EngineArgs(model="/m", device="cuda"), "a", "b", index=3)
    assert name == "worker3" and command[command.index("--device") + 1] == "cuda:3"


def test_engine_set_names_sockets_and_refuses_a_numbered_gpu(tmp_path):
    import pytest

    from scheduler_svc.engine_set import EngineSet

    one = EngineSet(EngineArgs(model="/m"), 1, tmp_path, "m")
    assert one.scheduler_addresses == [f"unix://{tmp_path}/scheduler.sock"]
    assert [n for n, _ in one.engines[0].commands] == ["scheduler", "worker"]
    two = EngineSet(EngineArgs(model="/m"), 2, tmp_path, "m")
    assert two.scheduler_addresses == [f"unix://{tmp_path}/engine{i}.sock" for i in range(2)]
    assert [[n for n, _ in e.commands] for e in two.engines] == [["scheduler0", "worker0"], ["scheduler1", "worker1"]]
    with pytest.raises(ValueError, match="--device cuda"):
        EngineSet(EngineArgs(model="/m", device="cuda:1"), 2, tmp_path, "m")


def test_engine_set_gives_each_engine_its_kv_events_address(tmp_path):
    from scheduler_svc.engine_set import EngineSet

    def endpoints(engine_args, n):
        commands = [dict(e.commands)[f"scheduler{i if n > 1 else ''}"] for i, e in enumerate(
            EngineSet(engine_args, n, tmp_path, "m").engines)]
        return [c[c.index("--kv-events-endpoint") + 1] for c in commands]

    bound = EngineArgs(model="/m", kv_events_endpoint="tcp://*:6000")
    assert endpoints(bound, 2) == ["tcp://*:6000", "tcp://*:6001"]
    assert endpoints(bound, 1) == ["tcp://*:6000"]
    assert endpoints(EngineArgs(model="/m", kv_events_endpoint="tcp://epp:5557"), 2) == ["tcp://epp:5557"] * 2
