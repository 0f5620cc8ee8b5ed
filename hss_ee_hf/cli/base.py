"""The base class of `hss-ee` subcommands (its own module so command modules can import it freely)."""

from __future__ import annotations

import argparse


class Command:
    """A subcommand: `name`, `help`, `add_arguments` and `run`."""

    name = ""
    help = ""

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        raise NotImplementedError

    def run(self, args: argparse.Namespace) -> int:
        raise NotImplementedError
