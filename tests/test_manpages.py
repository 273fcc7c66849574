"""The man pages in man/: mandoc-clean, and never behind the tools and the config.

Options are read from the tools' own parsers (tests/toolopts.py) and config
keys from the msgspec Structs of daemon/config.py, so a new option or key
without its line in the page fails here, naming both.
"""

from __future__ import annotations

import re
import subprocess
import typing
from pathlib import Path

import msgspec
import pytest

import toolopts
from daemon import config as configmod
from fsshelp import ROOT

MAN = ROOT / "man"
PAGES = ["fssd.4", "fssd.toml.5", "fssd.8", "fssconfig.8", "vssadm.8", "appvss.8"]


def lint(page: Path, level: str) -> list[str]:
    r = subprocess.run(["mandoc", "-T", "lint", "-W", level, str(page)], capture_output=True, text=True, timeout=60)
    # Whether a page an .Xr names is installed on this machine says nothing about ours.
    return [l for l in r.stdout.splitlines() if "referenced manual not found" not in l]


@pytest.mark.parametrize("page", PAGES)
def test_mandoc_lint_is_clean(page):
    assert lint(MAN / page, "style") == []


def test_mandoc_lint_does_see_a_broken_page(tmp_path):
    bad = tmp_path / "bad.8"
    bad.write_text((MAN / "vssadm.8").read_text().replace(".Bl -tag -width Ds\n", ".Bl -tag\n", 1).replace(".Sh EXIT STATUS", ".Sh EXIT", 1))
    assert lint(bad, "style") != []


def _documented_options(source: str) -> set[str]:
    """Every `Fl x` on an .It line: the options the page's lists describe."""
    out = set()
    for line in source.splitlines():
        if line.startswith(".It "):
            out |= {"-" + m for m in re.findall(r"\bFl (\S+)", line)}
    return out


@pytest.mark.parametrize("tool", toolopts.TOOLS)
def test_every_option_of_every_tool_is_in_its_page(tool):
    page = MAN / f"{tool}.8"
    documented = _documented_options(page.read_text())
    missing = [s for spellings in toolopts.options(tool) for s in spellings if s not in documented]
    assert not missing, f"man/{page.name} does not document {tool} option(s) {', '.join(missing)} (add `.It Fl ...` lines)"
    described = set(re.findall(r"^\.It Cm (\S+)", page.read_text(), re.M))
    missing = [c for c in toolopts.positional_choices(tool) if c not in described]
    assert not missing, f"man/{page.name} does not document {tool} operation(s) {', '.join(missing)}"


def test_the_option_check_catches_an_undocumented_option():
    source = (MAN / "vssadm.8").read_text().replace(".It Fl -json\n", ".It Cm json\n")
    assert "--json" not in _documented_options(source)


def config_sections() -> dict[str, list[str]]:
    """'[daemon]' -> its keys, '[[volume]]' -> ..., walking the Structs fssd decodes."""
    out: dict[str, list[str]] = {}

    def walk(struct: type, name: str, array: bool) -> None:
        heading = f"[[{name}]]" if array else f"[{name}]"
        keys = out.setdefault(heading, [])
        for f in msgspec.structs.fields(struct):
            t, is_array = f.type, False
            if typing.get_origin(t) is list and typing.get_args(t) and isinstance(typing.get_args(t)[0], type) \
                    and issubclass(typing.get_args(t)[0], msgspec.Struct):
                t, is_array = typing.get_args(t)[0], True
            if isinstance(t, type) and issubclass(t, msgspec.Struct):
                walk(t, f"{name}.{f.encode_name}" if name else f.encode_name, is_array)
            else:
                keys.append(f.encode_name)

    walk(configmod.Config, "", False)
    out.pop("[]")  # the top level holds only tables
    return out


def _page_sections(source: str) -> dict[str, set[str]]:
    sections: dict[str, set[str]] = {}
    current = None
    for line in source.splitlines():
        if line.startswith(".Ss ") or line.startswith(".Sh "):
            current = line[4:].replace("\\&", "").strip() if line.startswith(".Ss ") else None
            if current is not None:
                sections.setdefault(current, set())
        elif current and line.startswith(".It Cm "):
            sections[current].add(line.split()[2])
    return sections


def test_every_config_key_is_in_fssd_toml_5():
    sections = _page_sections((MAN / "fssd.toml.5").read_text())
    wanted = config_sections()
    assert set(wanted) >= {"[daemon]", "[[volume]]", "[vss]"}
    missing = [f"{heading} {key}" for heading, keys in wanted.items() for key in keys if key not in sections.get(heading, set())]
    assert not missing, (
        "man/fssd.toml.5 does not document config key(s) " + ", ".join(missing)
        + " (add `.It Cm KEY Ns = Ns Ar value` under `.Ss [SECTION]\\&`)"
    )
    stale = [f"{h} {k}" for h, keys in sections.items() if h in wanted for k in keys if k not in wanted[h]]
    assert not stale, f"man/fssd.toml.5 documents key(s) fssd does not have: {', '.join(stale)}"


def test_every_config_key_is_in_the_sample_config():
    text = (ROOT / "etc/fssd.toml").read_text()
    missing = [f"{h} {k}" for h, keys in config_sections().items() for k in keys
               if not re.search(rf"^#?\s*{re.escape(k)}\s*=", text, re.M)]
    assert not missing, f"etc/fssd.toml does not show config key(s) {', '.join(missing)}"


def test_pages_render_with_every_section_an_administrator_looks_for():
    for page in PAGES:
        source = (MAN / page).read_text()
        heads = re.findall(r"^\.Sh (.+)$", source, re.M)
        for head in ["NAME", "DESCRIPTION", "FILES", "SEE ALSO"]:
            assert head in heads, f"man/{page} has no {head}"
        if page.endswith(".8"):
            for head in ["SYNOPSIS", "EXIT STATUS", "EXAMPLES", "DIAGNOSTICS"]:
                assert head in heads, f"man/{page} has no {head}"
            see = source.split(".Sh SEE ALSO", 1)[1]
            assert ".Xr nbdcopy 1" in see or page in ("vssadm.8", "appvss.8"), page


# Patterns for files that are not in this repository, split so this file is no hit itself.
OUTSIDE = re.compile("|".join([r"\.\./" + "shared", "DESI" + "GN", "ecosystem" + r"\.md", "semantics" + r"\.md", "nbd-" + "peers"]))


def test_nothing_points_outside_the_repository():
    hits = []
    for p in ROOT.rglob("*"):
        rel = p.relative_to(ROOT)
        if not p.is_file() or rel.parts[0] in (".git", ".venv", "build", ".pytest_cache") or "__pycache__" in rel.parts \
                or rel.parts[0].endswith(".egg-info") or rel.parts[0] == "bench" and "out" in rel.parts:
            continue
        try:
            text = p.read_text()
        except (UnicodeDecodeError, OSError):
            continue
        hits += [f"{rel}:{n}: {l.strip()}" for n, l in enumerate(text.splitlines(), 1) if OUTSIDE.search(l)]
    assert hits == []
