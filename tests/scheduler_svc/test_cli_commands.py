"""The commands of ``pagedserve``: each is one declared Command, the parser is built from the list, and a
process role's command line goes to the role's own parser. The scheduler's config takes the engine
settings by name, so a field named as a setting must be one the scheduler process is given."""

import argparse
from dataclasses import fields

import pytest

from gpu_worker.engine_args import ROLES, EngineArgs
from scheduler_svc import cli
from scheduler_svc.command import Command, add_commands
from scheduler_svc.config import ENGINE_SETTINGS, SchedulerConfig


def test_every_command_is_in_the_overview_once(capsys):
    names = [c.name for c in cli.COMMANDS]
    assert len(names) == len(set(names))
    overview = " ".join(cli.build_parser().format_help().split())
    for command in cli.COMMANDS:
        assert f"{command.name} {command.help}" in overview
        if not command.process:  # its own --help: the description, or the help when it has none
            with pytest.raises(SystemExit) as exc:
                cli.main([command.name, "--help"])
            text = " ".join(capsys.readouterr().out.split())
            assert exc.value.code == 0 and " ".join((command.description or command.help).split()) in text


def test_a_command_declares_one_way_to_run():
    with pytest.raises(ValueError, match="'x' needs exactly one of run, subcommands or process"):
        Command("x", "help")
    with pytest.raises(ValueError, match="exactly one"):
        Command("x", "help", run=lambda a: 0, process="some.module")


def test_groups_and_commands_parse_to_their_run():
    ran = []
    inner = Command("b", "inner", add_arguments=lambda p: p.add_argument("--k", type=int, default=1),
                    run=lambda a: ran.append(a.k) or 0)
    parser = argparse.ArgumentParser()
    add_commands(parser, (Command("a", "group", subcommands=(inner,)),))
    args = parser.parse_args(["a", "b", "--k", "3"])
    assert (args.command, args.a) == ("a", "b") and args.func(args) == 0 and ran == [3]
    with pytest.raises(SystemExit):
        parser.parse_args(["a"])  # a group needs its subcommand


def test_a_process_role_parses_its_own_command_line(capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(["scheduler", "--help"])
    assert exc.value.code == 0
    assert "--max-num-waiting" in capsys.readouterr().out  # the scheduler's own parser: its engine settings


def test_the_scheduler_config_takes_exactly_the_scheduler_settings():
    named = {f.name for f in fields(SchedulerConfig)} & ENGINE_SETTINGS
    # Every setting the scheduler reads is on its command line; tensor_parallel_size goes to the service.
    assert named == set(ROLES["scheduler"]) - {"tensor_parallel_size"}
    changed = EngineArgs(block_size=32, max_num_waiting=3, kv_events_topic="t", async_scheduling=False)
    config = SchedulerConfig.from_engine_args(changed)
    assert (config.block_size, config.max_num_waiting, config.kv_events_topic, config.async_scheduling) == (
        32, 3, "t", False)
    assert config.watermark == SchedulerConfig().watermark  # not a setting: its own default


def test_the_worker_config_takes_exactly_the_worker_settings():
    from gpu_worker.worker import WorkerConfig

    named = {f.name for f in fields(WorkerConfig)} & ENGINE_SETTINGS
    # swap_space is there by name but in bytes (converted); tensor_parallel_size arrives as world_size.
    assert named == set(ROLES["worker"]) - {"tensor_parallel_size"}
    changed = EngineArgs(block_size=32, swap_space=0.5, tensor_parallel_size=2, seed=7, kv_cache_dtype="fp8")
    config = WorkerConfig.from_engine_args(changed, "ipc:///tmp/w", rank=1)
    assert (config.block_size, config.swap_space, config.world_size, config.rank, config.seed,
            config.kv_cache_dtype, config.scheduler_address) == (32, 2**29, 2, 1, 7, "fp8", "ipc:///tmp/w")
