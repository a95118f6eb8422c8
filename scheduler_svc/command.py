"""One way to declare a ``pagedserve`` command: a ``Command`` value beside the code it runs.

A command module ends with ``COMMAND = Command(name, help, description, add_arguments, run)``;
``scheduler_svc.cli`` lists the commands and builds the parser from them, so adding a command is its
module plus one line in that list. ``add_arguments(parser)`` declares its flags (engine settings through
``EngineArgs.add_args``, sampling through ``add_sampling_flags``: shared flags are declared once) and
``run(args)`` returns the exit status. A group (``bench``) holds ``subcommands`` instead; a process role
(``scheduler``, ``worker``, ``gateway``) names the module whose ``main(argv)`` parses the rest of the
command line itself, so that its own parser is the one its manifests and launchers are tested against.

Standard library only: building the parser imports every command module, and ``pagedserve --help``
must stay light (command modules import torch and the like inside ``run``).
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from dataclasses import dataclass

INTERRUPTED = 130  # the exit status of a command ended by Ctrl-C (the shell's code for SIGINT)


@dataclass(frozen=True, slots=True)
class Command:
    name: str
    help: str  # its line in ``pagedserve --help``
    description: str = ""  # ``pagedserve NAME --help``'s paragraph (default: help)
    add_arguments: Callable[[argparse.ArgumentParser], None] | None = None
    run: Callable[[argparse.Namespace], int | None] | None = None
    subcommands: tuple[Command, ...] = ()  # a group: ``pagedserve bench NAME``
    process: str = ""  # a process role: the module whose main(argv) takes the rest of the command line

    def __post_init__(self) -> None:
        kinds = (self.run is not None, bool(self.subcommands), bool(self.process))
        if sum(kinds) != 1:
            raise ValueError(f"command {self.name!r} needs exactly one of run, subcommands or process")

    def add_to(self, sub: argparse._SubParsersAction) -> None:
        """Adds this command (and its subcommands) to a parser's subcommands."""
        if self.process:  # parsed by the role itself: listed here for ``pagedserve --help``
            sub.add_parser(self.name, help=self.help, add_help=False)
            return
        p = sub.add_parser(self.name, help=self.help, description=self.description or self.help)
        if self.add_arguments is not None:
            self.add_arguments(p)
        if self.subcommands:
            group = p.add_subparsers(dest=self.name, required=True)
            for command in self.subcommands:
                command.add_to(group)
        else:
            p.set_defaults(func=self.run)


def add_commands(parser: argparse.ArgumentParser, commands: tuple[Command, ...]) -> None:
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for command in commands:
        command.add_to(sub)
