"""fssd says at start-up, one line per part, what cannot work on this system."""

from __future__ import annotations

import sys
from pathlib import Path

from daemon import config as configmod
from daemon import portability
from fsshelp import ROOT, run

LINUX = portability.Facts("linux", pidfd=True, proc=True, rwf_dsync=True, mqueues=True)
FREEBSD = portability.Facts("freebsd14", pidfd=False, proc=False, rwf_dsync=False, mqueues=True)


def _config(tmp_path: Path, vss: str) -> Path:
    conf = tmp_path / "fssd.toml"
    conf.write_text(
        f'[daemon]\nrundir = "{tmp_path}/run"\n\n[[volume]]\nname = "data"\npath = "{tmp_path}/data.img"\n'
        f'size = "16M"\nmountpoint = "{tmp_path}/mnt"\n\n[vss]\n{vss}\n'
    )
    return conf


def test_this_linux_machine_has_everything():
    assert portability.facts() == portability.Facts(sys.platform, True, True, True, True)
    cfg = configmod.Config()
    assert portability.problems(cfg, portability.facts()) == []


def test_freebsd_refuses_the_linux_only_parts(tmp_path):
    cfg = configmod.load(str(_config(tmp_path, "enabled = true")))
    lines = portability.problems(cfg, FREEBSD)
    assert [l.split(":")[0] for l in lines] == [
        "this system (freebsd14) has no pidfd_open(2) (Linux 5.3 or later)",
        "this system (freebsd14) has no Linux /proc",
        "this system (freebsd14) has no RWF_DSYNC (Linux 4.7 or later)",
        "[vss] freeze",
    ]
    assert "UFSSUSPEND ioctl on /dev/ufssuspend" in lines[3]
    # Nothing to freeze, no queues: only what is missing is named.
    cfg = configmod.load(str(_config(tmp_path, "freeze = []")))
    no_mq = portability.Facts("freebsd14", True, True, True, mqueues=False)
    assert portability.problems(cfg, no_mq) == [
        "[vss] enabled: this system has no POSIX message queues (FreeBSD: kldload mqueuefs); set [vss] enabled = false"
    ]
    assert portability.problems(cfg, LINUX) == []


def test_fssd_refuses_to_start_with_one_line_per_missing_part_and_starts_nothing(tmp_path):
    conf = _config(tmp_path, "enabled = true")
    code = (
        "import sys\n"
        "from daemon import portability\n"
        f"portability.facts = lambda: portability.Facts({FREEBSD.system!r}, False, False, False, True)\n"
        "from daemon.supervisor import main\n"
        f"sys.exit(main(['-c', {str(conf)!r}]))\n"
    )
    r = run(sys.executable, "-c", code, check=False, cwd=ROOT)
    assert r.returncode == 1
    lines = r.stderr.splitlines()
    assert len(lines) == 4 and all(l.startswith("fssd: ") for l in lines), r.stderr
    assert "Traceback" not in r.stderr
    assert not (tmp_path / "run").exists() and not (tmp_path / "data.img").exists()
