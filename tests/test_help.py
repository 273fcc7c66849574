"""--help and --version on every tool: stdout, exit 0, every option described."""

from __future__ import annotations

import re
from importlib import metadata
from pathlib import Path

import pytest

import toolopts
from fsshelp import BIN, run


def _words(text: str) -> str:
    return " ".join(text.split())


@pytest.mark.parametrize("tool", toolopts.TOOLS)
def test_help_lists_every_option_with_a_description_on_stdout(tool):
    r = run(BIN / tool, "--help")
    assert r.returncode == 0 and r.stderr == ""
    out = r.stdout
    if tool == "fssconfig":
        section = out.split("\noptions:\n", 1)[1]
        for (spelling,) in toolopts.options(tool):
            line = next((l for l in section.splitlines() if re.search(rf"(^|[\s,]){re.escape(spelling)}([\s,]|$)", l.split("  ", 2)[1] if l.startswith("  ") else "")), None)
            assert line is not None, f"fssconfig --help does not list {spelling}"
            assert re.search(r"\S\s{2,}\S", line.strip()), f"fssconfig --help: {spelling} has no description: {line!r}"
    else:
        for action in toolopts.argparse_actions(tool):
            assert action.help, f"{tool}: {action.option_strings or action.dest} has no help text"
            for s in action.option_strings:
                assert s in out, f"{tool} --help does not list {s}"
            described = _words(action.help % {"default": action.default, "prog": tool})
            assert described in _words(out), f"{tool} --help lacks the description of {action.option_strings}"


@pytest.mark.parametrize("tool", toolopts.TOOLS)
def test_version_prints_the_package_version(tool):
    r = run(BIN / tool, "--version")
    assert r.returncode == 0 and r.stderr == ""
    assert r.stdout == f"{tool} {metadata.version('fssd')}\n"


def test_version_falls_back_to_pyproject_when_not_installed(monkeypatch):
    from daemon import version as v

    def missing(name):
        raise metadata.PackageNotFoundError(name)

    monkeypatch.setattr(metadata, "version", missing)
    pyproject = (Path(v.__file__).resolve().parent.parent / "pyproject.toml").read_text()
    expected = re.search(r'^version\s*=\s*"([^"]+)"', pyproject, re.M).group(1)
    assert v.version() == expected


def test_appvss_name_and_rundir_have_help():
    actions = {a.dest: a for a in toolopts.argparse_actions("appvss")}
    assert actions["name"].help and actions["rundir"].help
