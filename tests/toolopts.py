"""Every option of every command-line tool, read from the tools' own parsers.

The argparse tools are run up to parse_args() and stopped there, so the parser
they really build is the one inspected; fssconfig (getopt, as NetBSD's) is run
up to its getopt() call and the option strings it passes are taken. Nothing is
copied from the tools by hand, so a new option shows up here by itself.
"""

from __future__ import annotations

import argparse
import getopt as getopt_mod
from contextlib import contextmanager
from unittest import mock

ARGPARSE_TOOLS = {
    "fssd": "daemon.supervisor",
    "vssadm": "daemon.cli.vssadm",
    "appvss": "daemon.cli.appvss",
}
TOOLS = ["fssd", "fssconfig", "vssadm", "appvss"]


class _Stop(Exception):
    def __init__(self, value):
        self.value = value


def argparse_parser(tool: str) -> argparse.ArgumentParser:
    import importlib

    mod = importlib.import_module(ARGPARSE_TOOLS[tool])

    def grab(self, *a, **kw):
        raise _Stop(self)

    with mock.patch.object(argparse.ArgumentParser, "parse_args", grab):
        try:
            mod.main([])
        except _Stop as s:
            return s.value
    raise AssertionError(f"{tool}: main() never called parse_args")


def fssconfig_getopt() -> tuple[str, list[str]]:
    """(shortopts, longopts) exactly as fssconfig parses them (its own quick parser and, for
    anything unusual, getopt itself)."""
    from daemon.cli import fssconfig

    return fssconfig.SHORT_OPTS, list(fssconfig.LONG_OPTS)


def options(tool: str) -> list[list[str]]:
    """Each option as its list of spellings, e.g. [['-r', '--rundir'], ['--json']].

    Positional arguments are left out (argparse's `op`): they are listed by
    their values where they matter (vssadm's operations)."""
    if tool == "fssconfig":
        short, long = fssconfig_getopt()
        # getopt does not pair -r with --rundir: each spelling stands alone.
        return [[f"-{c}"] for c in short if c != ":"] + [[f"--{name.rstrip('=')}"] for name in long]
    p = argparse_parser(tool)
    return [list(a.option_strings) for a in p._actions if a.option_strings]


def argparse_actions(tool: str) -> list[argparse.Action]:
    return list(argparse_parser(tool)._actions)


def positional_choices(tool: str) -> list[str]:
    if tool == "fssconfig":
        return []
    out = []
    for a in argparse_parser(tool)._actions:
        if not a.option_strings and a.choices:
            out += list(a.choices)
    return out
