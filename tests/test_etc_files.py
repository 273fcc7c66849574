"""The service files in etc/: systemd unit, udev rule, devd conf, rc.d script, install.mk.

What each test really checks is in its name: systemd-analyze runs on the unit;
udev rules are checked twice, by a static key/operator checker written from
udev(7) and by systemd-udevd's own parser and rule engine (`udevadm test`, in a
throw-away mount namespace so nothing on the host changes); the devd file only
by a structure checker (no devd here); the rc.d script by `sh -n` and by
running it against a stub rc.subr.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest

ETC = Path(__file__).resolve().parent.parent / "etc"
UNIT = ETC / "systemd" / "fssd.service"
RULES = ETC / "udev" / "90-fssd.rules"
DEVD = ETC / "devd" / "fssd.conf"
RCD = ETC / "rc.d" / "fssd"
INSTALL_MK = ETC / "install.mk"


def run(*cmd, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120, **kw)


# --------------------------------------------------------------------------- systemd


def _unit_settings(text: str) -> list[tuple[str, str, str]]:
    section, out = "", []
    for line in text.splitlines():
        line = line.strip()
        if not line or line[0] in "#;":
            continue
        if line.startswith("["):
            section = line.strip("[]")
            continue
        key, _, value = line.partition("=")
        out.append((section, key.strip(), value.strip()))
    return out


def _verifiable_copy(tmp_path: Path, extra: str = "") -> Path:
    # verify checks that ExecStart's binary exists: point it at this python.
    text = UNIT.read_text().replace("ExecStart=/usr/local/sbin/fssd ", f"ExecStart={sys.executable} ", 1)
    assert sys.executable in text
    copy = tmp_path / "fssd.service"
    copy.write_text(text + extra)
    return copy


def _verify(unit: Path) -> tuple[int, list[str]]:
    r = run("systemd-analyze", "verify", "--man=no", str(unit))
    lines = (r.stdout + r.stderr).splitlines()
    # Only what concerns our unit, not other units installed on the host.
    return r.returncode, [l for l in lines if "fssd.service" in l]


def test_unit_passes_systemd_analyze_verify_without_any_message(tmp_path):
    rc, ours = _verify(_verifiable_copy(tmp_path))
    assert rc == 0 and ours == []


def test_systemd_analyze_verify_does_report_a_bad_key(tmp_path):
    # The check above would see a mistake: unknown keys are only warnings.
    rc, ours = _verify(_verifiable_copy(tmp_path, "\n[Service]\nPrivateBogus=yes\n"))
    assert any("PrivateBogus" in l for l in ours), ours


def test_unit_security_exposure_stays_ok(tmp_path):
    r = run("systemd-analyze", "security", "--offline=yes", "--no-pager", str(_verifiable_copy(tmp_path)))
    m = re.search(r"Overall exposure level for fssd\.service: (\d+\.\d)", r.stdout)
    assert m, r.stdout + r.stderr
    # 3.3 when written (systemd 252); dropping hardening would push it up.
    assert float(m.group(1)) <= 4.0


def test_unit_settings_required_by_fssd():
    settings = _unit_settings(UNIT.read_text())
    service = {k: v for s, k, v in settings if s == "Service"}
    assert service["Type"] == "notify"
    assert service["NotifyAccess"] == "main"
    assert service["ExecStart"] == "/usr/local/sbin/fssd -c /etc/fssd/fssd.toml"  # make install's default PREFIX
    assert service["ExecReload"] == "/bin/kill -HUP $MAINPID"
    assert service["KillMode"] == "mixed"
    assert service["WatchdogSec"] == "30"
    assert service["Restart"] == "on-failure"
    assert service["RuntimeDirectory"] == "fssd"
    assert service["LimitMSGQUEUE"] == "8M"
    assert "TimeoutStopSec" in service
    # Options that would break fssd (etc/README.md, "Not set, on purpose").
    for key in ("PrivateIPC", "PrivateDevices", "PrivateMounts", "PrivateNetwork", "RemoveIPC", "MemoryDenyWriteExecute"):
        assert key not in service, key
    assert service.get("ProtectSystem") != "strict" or "ReadWritePaths" in service
    allowed = [v for s, k, v in settings if k == "DeviceAllow"]
    assert "block-* rw" in allowed and "char-misc rw" in allowed
    families = service["RestrictAddressFamilies"].split()
    assert "AF_UNIX" in families
    assert "CAP_SYS_ADMIN" in service["CapabilityBoundingSet"].split()  # FIFREEZE


# --------------------------------------------------------------------------- udev

# udev(7), systemd 252. key -> (attribute: required/optional/forbidden, allowed operators)
_MATCH = {"==", "!="}
_ASSIGN = {"=", "+=", "-=", ":="}
UDEV_KEYS = {
    "ACTION": ("no", _MATCH),
    "DEVPATH": ("no", _MATCH),
    "KERNEL": ("no", _MATCH),
    "KERNELS": ("no", _MATCH),
    "SUBSYSTEM": ("no", _MATCH),
    "SUBSYSTEMS": ("no", _MATCH),
    "DRIVER": ("no", _MATCH),
    "DRIVERS": ("no", _MATCH),
    "ATTRS": ("yes", _MATCH),
    "TAGS": ("no", _MATCH),
    "CONST": ("yes", _MATCH),
    "TEST": ("optional", _MATCH),
    "PROGRAM": ("no", _MATCH),
    "RESULT": ("no", _MATCH),
    "NAME": ("no", _MATCH | {"=", ":="}),
    "SYMLINK": ("no", _MATCH | _ASSIGN),
    "ATTR": ("yes", _MATCH | {"="}),
    "SYSCTL": ("yes", _MATCH | {"="}),
    "ENV": ("yes", _MATCH | _ASSIGN),
    "TAG": ("no", _MATCH | _ASSIGN),
    "OWNER": ("no", {"=", ":="}),
    "GROUP": ("no", {"=", ":="}),
    "MODE": ("no", {"=", ":="}),
    "SECLABEL": ("yes", {"=", "+=", ":="}),
    "RUN": ("optional", {"=", "+=", ":="}),
    "IMPORT": ("yes", {"=", "+="}),
    "OPTIONS": ("no", {"=", "+=", ":="}),
    "LABEL": ("no", {"="}),
    "GOTO": ("no", {"="}),
}
_PAIR = re.compile(r'\s*([A-Z_]+)(?:\{([^}]*)\})?\s*(==|!=|\+=|-=|:=|=)\s*"((?:[^"\\]|\\.)*)"\s*')


def udev_rule_errors(text: str) -> list[str]:
    """Key, attribute, operator, quoting and comma errors, and GOTOs without a LABEL."""
    errors, labels, gotos = [], set(), []
    lines = text.replace("\\\n", "").splitlines()
    for n, line in enumerate(lines, 1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        pos, first = 0, True
        while pos < len(line):
            if not first:
                if line[pos] != ",":
                    errors.append(f"{n}: expected ',' at column {pos + 1}")
                    break
                pos += 1
            m = _PAIR.match(line, pos)
            if not m:
                errors.append(f"{n}: cannot parse from column {pos + 1}: {line[pos:]!r}")
                break
            key, attr, op, value = m.groups()
            if key not in UDEV_KEYS:
                errors.append(f"{n}: unknown key {key}")
            else:
                need, ops = UDEV_KEYS[key]
                if need == "yes" and attr is None:
                    errors.append(f"{n}: {key} needs {{attribute}}")
                if need == "no" and attr is not None:
                    errors.append(f"{n}: {key} takes no {{attribute}}")
                if op not in ops:
                    errors.append(f"{n}: operator {op} not allowed for {key}")
            if key == "LABEL":
                labels.add(value)
            if key == "GOTO":
                gotos.append((n, value))
            pos, first = m.end(), False
    errors += [f"{n}: GOTO {v!r} has no LABEL" for n, v in gotos if v not in labels]
    return errors


def test_udev_rules_pass_static_key_operator_checker():
    assert udev_rule_errors(RULES.read_text()) == []


@pytest.mark.parametrize(
    "line, fragment",
    [
        ('ACTION=="add" KERNEL=="x", TAG+="systemd"', "expected ','"),
        ('ACTION=="add", FOO=="x"', "unknown key FOO"),
        ('ACTION="add"', "operator = not allowed for ACTION"),
        ('ENV="x"', "ENV needs {attribute}"),
        ('KERNEL=="x", GOTO="nowhere"', "has no LABEL"),
        ('KERNEL=="x', "cannot parse"),
    ],
)
def test_static_udev_checker_catches(line, fragment):
    errors = udev_rule_errors(line + "\n")
    assert any(fragment in e for e in errors), errors


def test_udev_rules_start_fssd_the_systemd_way():
    text = RULES.read_text()
    wants = [l for l in text.splitlines() if "SYSTEMD_WANTS" in l and not l.startswith("#")]
    assert len(wants) == 2
    for line in wants:
        assert 'TAG+="systemd"' in line and 'ENV{SYSTEMD_WANTS}+="fssd.service"' in line
    assert 'ACTION=="add", KERNEL=="vmbus/hv_vss"' in wants[0]
    assert not re.search(r"^[^#]*\bRUN\b", text, re.M)  # udevd would kill a daemon started by RUN


def _udevadm_test(tmp_path: Path, rules: dict[str, str], syspath: str, node: tuple[str, str, str] | None) -> str:
    """`udevadm test` with extra rules in /run/udev/rules.d, in a private mount namespace.

    systemd 252's `udevadm test` really writes the udev database, creates
    symlinks and sets device permissions; with tmpfs over /run and /dev in a
    namespace of its own none of that reaches the host.
    """
    for name, text in rules.items():
        (tmp_path / name).write_text(text)
    script = ["set -e", "mount --make-rprivate /", "mount -t tmpfs tmpfs /run", "mount -t tmpfs tmpfs /dev",
              "mknod -m 666 /dev/null c 1 3", "mkdir -p /run/udev/rules.d"]
    if node:
        kind, devname, majmin = node
        major, minor = majmin.split(":")
        script.append(f"mknod -m 600 /dev/{devname} {kind} {major} {minor}")
    script += [f"cp {tmp_path / name} /run/udev/rules.d/{name}" for name in rules]
    script.append(f"udevadm test --action=add {syspath}")
    r = run("unshare", "--mount", "--propagation", "private", "sh", "-c", "\n".join(script))
    assert r.returncode == 0, r.stdout + r.stderr
    return r.stdout + r.stderr


def _a_block_device() -> tuple[str, str]:
    names = sorted(os.listdir("/sys/class/block"))
    assert names, "no block device to run udevadm test on"
    name = next((n for n in names if n.startswith("loop")), names[0])
    return name, Path(f"/sys/class/block/{name}/dev").read_text().strip()


def _props(output: str) -> dict[str, str]:
    return dict(l.split("=", 1) for l in output.splitlines() if re.match(r"^[A-Z_]+=", l))


@pytest.mark.parametrize(
    "mark, wanted",
    [
        ('ENV{FSSD}="1"', True),
        ('ENV{ID_PART_ENTRY_NAME}="fssd-data"', True),
        ('ENV{ID_PART_ENTRY_NAME}="data"', False),
        ('ENV{FSSD_OTHER}="1"', False),
    ],
)
def test_udevadm_test_marked_block_device_wants_fssd(tmp_path, mark, wanted):
    name, majmin = _a_block_device()
    rules = {
        "80-fssd-mark.rules": f'SUBSYSTEM=="block", KERNEL=="{name}", {mark}\n',
        "90-fssd.rules": RULES.read_text(),
    }
    out = _udevadm_test(tmp_path, rules, f"/sys/class/block/{name}", ("b", name, majmin))
    assert "Reading rules file: /run/udev/rules.d/90-fssd.rules" in out
    # udevd's parser names the file and line of anything it rejects.
    assert [l for l in out.splitlines() if "90-fssd.rules:" in l] == []
    props = _props(out)
    assert ("fssd.service" in props.get("SYSTEMD_WANTS", "").split()) == wanted
    assert ":systemd:" in props["TAGS"]


def test_udevadm_test_hyperv_rule_on_a_misc_device_standing_in_for_hv_vss(tmp_path):
    # No Hyper-V here: run the same rule line with KERNEL== naming a misc
    # device that exists, to see udevd tag it and add the want.
    misc = sorted(p for p in os.listdir("/sys/class/misc") if os.path.exists(f"/sys/class/misc/{p}/dev"))
    assert misc
    name = misc[0]
    text = RULES.read_text()
    assert text.count('KERNEL=="vmbus/hv_vss"') == 1
    rules = {"90-fssd.rules": text.replace('KERNEL=="vmbus/hv_vss"', f'KERNEL=="{name}"')}
    out = _udevadm_test(tmp_path, rules, f"/sys/class/misc/{name}", None)
    props = _props(out)
    assert props.get("SYSTEMD_WANTS") == "fssd.service"
    assert ":systemd:" in props["TAGS"]


# --------------------------------------------------------------------------- devd

_DEVD_TOKEN = re.compile(r'\s*(?:(#[^\n]*)|("(?:[^"\\]|\\.)*")|([{};])|([^\s{};"]+))')


def devd_statements(text: str) -> list[dict]:
    """Parse devd.conf(5) `notify|attach|detach|nomatch [prio] { match "k" "v"; action "..."; };`.

    Raises ValueError on any brace, semicolon or arity error.
    """
    tokens, pos = [], 0
    while pos < len(text):
        m = _DEVD_TOKEN.match(text, pos)
        if not m or m.end() == pos:
            if text[pos:].strip() == "":
                break
            raise ValueError(f"bad token at {pos}")
        pos = m.end()
        if m.group(1):
            continue
        tokens.append(m.group(2) or m.group(3) or m.group(4))
    out, i = [], 0

    def expect(tok):
        nonlocal i
        if i >= len(tokens) or tokens[i] != tok:
            raise ValueError(f"expected {tok!r} at token {i}, got {tokens[i] if i < len(tokens) else 'EOF'!r}")
        i += 1

    while i < len(tokens):
        kind = tokens[i]
        if kind not in ("notify", "attach", "detach", "nomatch"):
            raise ValueError(f"unknown statement {kind!r}")
        i += 1
        prio = int(tokens[i]) if tokens[i].isdigit() else None
        i += prio is not None
        expect("{")
        stmt = {"kind": kind, "priority": prio, "match": {}, "action": []}
        while i < len(tokens) and tokens[i] != "}":
            word = tokens[i]
            if word == "match":
                key, value = tokens[i + 1], tokens[i + 2]
                if not (key.startswith('"') and value.startswith('"')):
                    raise ValueError("match takes two quoted strings")
                stmt["match"][key.strip('"')] = value.strip('"')
                i += 3
            elif word == "action":
                if not tokens[i + 1].startswith('"'):
                    raise ValueError("action takes one quoted string")
                stmt["action"].append(tokens[i + 1].strip('"'))
                i += 2
            else:
                raise ValueError(f"unknown sub-statement {word!r}")
            expect(";")
        expect("}")
        expect(";")
        out.append(stmt)
    return out


def test_devd_conf_structure_and_actions():
    stmts = devd_statements(DEVD.read_text())
    assert len(stmts) == 2
    actions = {}
    for s in stmts:
        assert s["kind"] == "notify" and s["priority"] == 11
        m = s["match"]
        assert (m["system"], m["subsystem"], m["cdev"]) == ("DEVFS", "CDEV", "hv_fsvss_dev")
        assert len(s["action"]) == 1
        actions[m["type"]] = s["action"][0]
    assert actions == {"CREATE": "service fssd start", "DESTROY": "service fssd stop"}


@pytest.mark.parametrize(
    "bad",
    [
        'notify 11 { match "system" "DEVFS" action "x"; };',  # missing ;
        'notify 11 { match "system" "DEVFS"; action "x"; }',  # missing final ;
        'notify 11 { match "system"; };',  # match arity
        'notify 11 { match "system" "DEVFS"; action "x"; ',  # unclosed
    ],
)
def test_devd_checker_catches(bad):
    with pytest.raises((ValueError, IndexError)):
        devd_statements(bad)


# --------------------------------------------------------------------------- rc.d


def test_rcd_script_parses_with_sh_n():
    r = run("sh", "-n", str(RCD))
    assert r.returncode == 0, r.stderr


def _rcd_with_stub(tmp_path: Path) -> Path:
    stub = tmp_path / "rc.subr"
    # Just enough of rc.subr to show what run_rc_command would be given.
    stub.write_text(
        "load_rc_config() { :; }\n"
        "run_rc_command() {\n"
        '  case "$1" in\n'
        '  start) echo "$command $command_args"; echo "pidfile=$pidfile procname=$procname rcvar=$rcvar" ;;\n'
        '  reload) $reload_cmd ;;\n'
        '  status) $status_cmd ;;\n'
        "  esac\n"
        "}\n"
    )
    text = RCD.read_text()
    assert text.count(". /etc/rc.subr") == 1
    script = tmp_path / "fssd"
    script.write_text(text.replace(". /etc/rc.subr", f". {stub}"))
    return script


def test_rcd_script_start_command_with_stub_rc_subr(tmp_path):
    r = run("sh", str(_rcd_with_stub(tmp_path)), "start", env={"PATH": os.environ["PATH"], "fssd_config": "/c.toml"})
    assert r.returncode == 0, r.stderr
    cmd, info = r.stdout.splitlines()
    assert cmd.split() == [
        "/usr/sbin/daemon", "-f", "-r", "-R", "2", "-t", "fssd", "-o", "/var/log/fssd.log", "-H",
        "-P", "/var/run/fssd.daemon.pid", "-p", "/var/run/fssd.pid",
        "/usr/local/sbin/fssd", "-c", "/c.toml", "-r", "/var/run/fssd",
    ]
    assert info == "pidfile=/var/run/fssd.daemon.pid procname=daemon rcvar=fssd_enable"
    code = [l for l in RCD.read_text().splitlines() if not l.lstrip().startswith("#")]
    assert not any("pkill" in l for l in code)  # setproctitle'd processes: pidfiles only


def test_rcd_reload_sends_sighup_to_fssd_pid_and_status_runs_fssconfig(tmp_path):
    # A stand-in for fssd that reports when SIGHUP arrives.
    child = subprocess.Popen(
        [sys.executable, "-c",
         "import signal,sys\n"
         "signal.signal(signal.SIGHUP, lambda *a: (print('HUP', flush=True), sys.exit(0)))\n"
         "print('ready', flush=True)\n"
         "signal.pause()\n"],
        stdout=subprocess.PIPE, text=True,
    )
    try:
        assert child.stdout.readline() == "ready\n"
        pidfile = tmp_path / "fssd.pid"
        pidfile.write_text(f"{child.pid}\n")
        fake = tmp_path / "fssconfig"
        fake.write_text('#!/bin/sh\necho "fssconfig $* rundir=$FSSD_RUNDIR"\n')
        fake.chmod(0o755)
        env = {"PATH": os.environ["PATH"], "fssd_pidfile": str(pidfile), "fssd_fssconfig": str(fake)}
        script = _rcd_with_stub(tmp_path)
        assert run("sh", str(script), "reload", env=env).returncode == 0
        assert child.stdout.readline() == "HUP\n"
        assert child.wait(timeout=10) == 0
        r = run("sh", str(script), "status", env=env)
        assert r.stdout == "fssconfig -l rundir=/var/run/fssd\n"
    finally:
        if child.poll() is None:
            child.send_signal(signal.SIGKILL)
            child.wait()


# --------------------------------------------------------------------------- install.mk


def _make(*args, cwd=None) -> subprocess.CompletedProcess:
    r = run("make", *args, cwd=cwd)
    assert r.returncode == 0, r.stdout + r.stderr
    return r


def test_install_mk_install_and_uninstall_with_destdir(tmp_path):
    root = tmp_path / "root"
    sample = tmp_path / "sample.toml"
    sample.write_text("# sample\n")
    common = ["-f", str(INSTALL_MK), f"DESTDIR={root}", "PREFIX=/opt/fssd", "SYSCONFDIR=/etc/alt",
              "NO_PY=1", f"FSSD_CONFIG={sample}"]
    _make(*common, "install")
    files = sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())
    pages = sorted(f"opt/fssd/share/man/man{p.suffix[1:]}/{p.name}" for p in (ETC.parent / "man").iterdir())
    assert len(pages) == 6
    assert files == sorted(["etc/alt/fssd/fssd.toml", "lib/systemd/system/fssd.service", "lib/udev/rules.d/90-fssd.rules",
                            "opt/fssd/lib/fssd/install-manifest", *pages])
    unit = (root / "lib/systemd/system/fssd.service").read_text()
    assert "ExecStart=/opt/fssd/sbin/fssd -c /etc/alt/fssd/fssd.toml\n" in unit
    assert unit.replace("ExecStart=/opt/fssd/sbin/fssd -c /etc/alt/", "ExecStart=/usr/local/sbin/fssd -c /etc/") == UNIT.read_text()
    assert (root / "lib/udev/rules.d/90-fssd.rules").read_text() == RULES.read_text()
    assert (root / "lib/systemd/system/fssd.service").stat().st_mode & 0o777 == 0o644

    # The administrator's configuration survives a reinstall and an uninstall.
    conf = root / "etc/alt/fssd/fssd.toml"
    conf.write_text("# edited by the admin\n")
    out = _make(*common, "install").stdout
    assert "keeping existing" in out and conf.read_text() == "# edited by the admin\n"
    _make(*common, "uninstall")
    files = sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())
    assert files == ["etc/alt/fssd/fssd.toml"]


def test_install_mk_included_from_another_makefile_keeps_its_default_goal(tmp_path):
    top = tmp_path / "top"
    top.mkdir()
    (top / "Makefile").write_text(f"include {INSTALL_MK}\n\nall:\n\t@echo default goal is all\n")
    assert "default goal is all" in _make("-C", str(top)).stdout
    sample = tmp_path / "sample.toml"
    sample.write_text("# sample\n")
    # Paths inside install.mk resolve from its own directory, not the includer's.
    _make("-C", str(top), "install", f"DESTDIR={tmp_path / 'root'}", "NO_PY=1", f"FSSD_CONFIG={sample}")
    assert (tmp_path / "root/lib/systemd/system/fssd.service").read_text().startswith("# fssd:")
    assert (tmp_path / "root/usr/local/lib/fssd/install-manifest").is_file()
