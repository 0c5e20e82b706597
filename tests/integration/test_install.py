"""The README's first command on this host's system Python: install, upgrade, uninstall.

The command is read from README.md (its first code block), so the README and
this test cannot drift, and run through /bin/sh from the checkout with PATH
reduced to the system directories: /usr/bin/python3, marked externally
managed (PEP 668), is the only Python it can find. It installs for real into
/opt/c8, /usr/local/bin, /etc/capsule8 and /etc/systemd/system, so the test
refuses to run over an existing installation and removes what it made, even
when it fails; an /etc/capsule8/capsule8-sensor.yaml present before is left
as it was. Without systemd (this machine) the script starts the sensor itself
and passes CAPSULE8_* variables on, so the sensor gets a private run_dir and
sensor id file and cannot collide with other sensors on the host; under
systemd the unit runs it with the defaults (/var/run/capsule8), and the test
refuses to start when a sensor already runs there.
"""

from __future__ import annotations

import json
import os
import pwd
import re
import select
import shutil
import subprocess
import time
import uuid
from pathlib import Path

import pytest

from tests.integration.sensor import wait_for

pytestmark = [pytest.mark.root, pytest.mark.slow, pytest.mark.timeout(600)]

REPO = Path(__file__).resolve().parents[2]
SYSTEM_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
SYSTEM_PYTHON = "/usr/bin/python3"
VENV = "/opt/c8/venv"
COMMANDS = ("c8-supervisor", "c8ctl", "c8-telemetry")
UNIT = "/etc/systemd/system/c8-supervisor.service"
INSTALLED = ("/opt/c8", UNIT, *(f"/usr/local/bin/{c}" for c in COMMANDS))
CONF = Path("/etc/capsule8/capsule8-sensor.yaml")
CONF_DIR, STATE_DIR, LOG_DIR = "/etc/capsule8", "/var/lib/capsule8", "/var/log/capsule8"
SUPERVISOR_LOG = "/var/log/c8-supervisor.log"  # where the script starts it without systemd
# Where an installation could leave something: entries named *c8* or *capsule8*.
WATCHED = ("/opt", "/usr/local/bin", "/usr/local/sbin", "/etc", "/etc/systemd/system",
           "/etc/systemd/system/multi-user.target.wants", "/var/lib", "/var/log", "/run")
INSTALL_TIMEOUT = 300  # a first install downloads the dependencies from PyPI
SYSTEMD = os.path.isdir("/run/systemd/system")
DEFAULT_RUN_DIR = "/var/run/capsule8"


def readme_first_command() -> str:
    """The README's first code block: the one command a new user types."""
    text = (REPO / "README.md").read_text()
    m = re.search(r"```sh\n(.*?)```", text, re.S)
    assert m, "README.md has no ```sh code block"
    cmd = m.group(1).strip()
    assert "\n" not in cmd, f"the README's first block should be one command: {cmd!r}"
    assert "scripts/install.sh" in cmd, f"the README's first command is not scripts/install.sh: {cmd!r}"
    return cmd


def ours(path: str) -> bool:
    """Owned by root or capsule8: what the script or its sensor can have made. Other
    tests on a shared machine run sensors as other users, with their own files."""
    try:
        uid = os.lstat(path).st_uid
    except FileNotFoundError:
        return False
    try:
        sensor_uid = pwd.getpwnam("capsule8").pw_uid
    except KeyError:
        sensor_uid = 0
    return uid in (0, sensor_uid)


def traces() -> set[str]:
    """Paths under WATCHED whose name mentions c8 or capsule8, and are ours()."""
    found = set()
    for d in WATCHED:
        try:
            names = os.listdir(d)
        except FileNotFoundError:
            continue
        found |= {os.path.join(d, n) for n in names if "c8" in n or "capsule8" in n}
    return {p for p in found if ours(p)}


def supervisor_json(run_dir: str) -> dict:
    with open(os.path.join(run_dir, "supervisor.json")) as f:
        return json.load(f)


def alive(pid: int) -> bool:
    """`pid` is a live (not zombie) process of the sensor: its title starts with c8-."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            running = f.read().split(") ", 1)[1][0] != "Z"
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return running and f.read().startswith(b"c8-")
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return False


def status_uid(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        return int(next(ln for ln in f if ln.startswith("Uid:")).split()[1])


class Host:
    """The reduced environment the commands run in, as a user's root shell would be."""

    def __init__(self, tmp_path: Path):
        self.env = {"PATH": SYSTEM_PATH, "HOME": os.environ.get("HOME", "/root"),
                    "LANG": "C.UTF-8"}
        if SYSTEMD:  # the unit's sensor gets none of our environment
            self.run_dir = DEFAULT_RUN_DIR
        else:
            self.run_dir = str(tmp_path / "run")
            self.env.update(CAPSULE8_RUN_DIR=self.run_dir,
                            CAPSULE8_SENSOR_ID_FILE=str(tmp_path / "sensor_id"))
        # How pip reaches PyPI here (proxies, mirrors) is not a Python choice.
        self.env.update({k: v for k, v in os.environ.items()
                         if k.startswith("PIP_") or k.lower().endswith("_proxy")})
        self.pids: set[int] = set()  # every supervisor this test started

    def sh(self, cmd: str, cwd: Path | str = REPO, timeout: float = 60) -> subprocess.CompletedProcess:
        res = subprocess.run(["/bin/sh", "-c", cmd], cwd=cwd, env=self.env, capture_output=True,
                             text=True, timeout=timeout)
        self.note_supervisor()
        return res

    def note_supervisor(self) -> int | None:
        try:
            pid = int(supervisor_json(self.run_dir)["pid"])
        except (OSError, ValueError, KeyError):
            return None
        self.pids.add(pid)
        return pid

    def sees_exec(self, marker: str, timeout: float = 30) -> None:
        """The installed c8ctl's subscription receives the EXEC of `/bin/true <marker>`.

        The sensor is lossy by design: the stream may also carry `lost` events,
        and when one comes before the EXEC (which it may have covered), the
        exec is made again, within the same deadline.
        """
        proc = subprocess.Popen(
            ["/bin/sh", "-c", f"exec c8ctl subscribe --events process "
                              f"--filter 'exec_command_line like \"*{marker}*\"'"],
            cwd="/", env=self.env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        deadline = time.monotonic() + timeout
        seen: list[dict] = []
        try:
            # c8ctl prints the subscription id once the collectors run the plan.
            assert select.select([proc.stderr], [], [], 20)[0], "c8ctl subscribe said nothing in 20s"
            first = proc.stderr.readline()
            assert "subscription" in first, first
            subprocess.run(["/bin/true", marker], check=True)
            while time.monotonic() < deadline:
                if not select.select([proc.stdout], [], [], deadline - time.monotonic())[0]:
                    break
                line = proc.stdout.readline()
                if not line:
                    break  # c8ctl ended
                event = json.loads(line)
                seen.append(event)
                if event["type"] == "process":
                    assert (event["kind"], event["exec_command_line"]) == \
                        ("EXEC", f"/bin/true {marker}"), event
                    return
                if event["type"] == "lost":
                    subprocess.run(["/bin/true", marker], check=True)
        finally:
            proc.kill()
            _, err = proc.communicate()
        raise AssertionError(f"no EXEC of /bin/true {marker} in {timeout}s: {seen} {err}")


def upgraded_checkout(dest: Path) -> tuple[Path, str]:
    """A copy of the checkout with a new version number: the 'new code'."""
    shutil.copytree(REPO, dest, symlinks=True, ignore=shutil.ignore_patterns(
        ".git", "__pycache__", "*.egg-info", "build", ".pytest_cache", ".ruff_cache"))
    pyproject = dest / "pyproject.toml"
    text = pyproject.read_text()
    m = re.search(r'^version = "([^"]+)"$', text, re.M)
    assert m, "no version line in pyproject.toml"
    version = f"{m.group(1)}+upgradetest"
    pyproject.write_text(text[:m.start(1)] + version + text[m.end(1):])
    return dest, version


def unit_state(verb: str) -> str:
    """`systemctl is-enabled|is-active c8-supervisor.service`."""
    return subprocess.run(["systemctl", verb, "c8-supervisor.service"], capture_output=True,
                          text=True, timeout=30).stdout.strip()


def installed_version() -> str:
    return subprocess.run([f"{VENV}/bin/python", "-I", "-c",
                           "from importlib.metadata import version; print(version('c8'))"],
                          capture_output=True, text=True, check=True).stdout.strip()


def check_running(host: Host, want_config: bytes) -> int:
    """The sensor answers c8ctl status, runs the system Python from the venv, its
    children as sensor_user; returns the supervisor's pid."""
    st = host.sh("c8ctl status")
    assert st.returncode == 0, st.stdout + st.stderr
    assert "c8-broker" in st.stdout, st.stdout
    sup = wait_for(lambda: (s := supervisor_json(host.run_dir))["children"] and all(
        c["state"] == "RUNNING" for c in s["children"]) and s, 30, what="every child RUNNING")
    pid = sup["pid"]
    python = os.path.realpath(SYSTEM_PYTHON)
    assert os.path.realpath(f"/proc/{pid}/exe") == python
    user = pwd.getpwnam("capsule8")
    for child in sup["children"]:
        assert os.path.realpath(f"/proc/{child['pid']}/exe") == python
        assert status_uid(child["pid"]) == user.pw_uid, child
    assert CONF.read_bytes() == want_config
    return pid


@pytest.fixture
def host(tmp_path):
    """Refuse to run over an installation; afterwards remove whatever the test left."""
    existing = [p for p in INSTALLED if os.path.lexists(p)]
    if existing:
        pytest.fail(f"{', '.join(existing)} exist: this test installs there and would "
                    "replace a real installation; uninstall it first (scripts/install.sh --uninstall)")
    h = Host(tmp_path)
    if SYSTEMD and (running := h.note_supervisor()) and alive(running):
        pytest.fail(f"a c8-supervisor (pid {running}) runs in {DEFAULT_RUN_DIR}: the unit's "
                    "sensor would collide with it")
    h.pids.clear()
    h.conf_before = CONF.read_bytes() if CONF.exists() else None
    h.dirs_before = {d: os.path.lexists(d) for d in (CONF_DIR, STATE_DIR, LOG_DIR, SUPERVISOR_LOG)}
    h.traces_before = traces()
    try:
        yield h
    finally:
        if any(os.path.lexists(p) for p in INSTALLED) or any(alive(p) for p in h.pids):
            subprocess.run([str(REPO / "scripts/install.sh"), "--uninstall"], env=h.env,
                           cwd="/", capture_output=True, timeout=120)
        for pid in h.pids:  # only supervisors this test started, should uninstall have failed
            if alive(pid):
                os.kill(pid, 9)
        if h.conf_before is not None and CONF.read_bytes() != h.conf_before:
            CONF.write_bytes(h.conf_before)
        for d, existed in h.dirs_before.items():
            if not existed and ours(d):
                if os.path.isdir(d):
                    shutil.rmtree(d, ignore_errors=True)
                else:
                    os.remove(d)


def test_readme_first_command_installs_upgrades_and_uninstalls(host, tmp_path):
    cmd = readme_first_command()
    # The premise: the only Python on the reduced PATH is the system's, externally managed.
    assert shutil.which("python3", path=SYSTEM_PATH) == SYSTEM_PYTHON
    stdlib = subprocess.run([SYSTEM_PYTHON, "-I", "-c", "import sysconfig; print(sysconfig.get_path('stdlib'))"],
                            capture_output=True, text=True, check=True).stdout.strip()
    assert os.path.exists(os.path.join(stdlib, "EXTERNALLY-MANAGED"))

    # Install.
    res = host.sh(cmd, timeout=INSTALL_TIMEOUT)
    assert res.returncode == 0, res.stdout + res.stderr
    for c in COMMANDS:
        assert os.readlink(f"/usr/local/bin/{c}") == f"{VENV}/bin/{c}"
        assert shutil.which(c, path=SYSTEM_PATH) == f"/usr/local/bin/{c}"
    assert os.path.realpath(f"{VENV}/bin/python") == os.path.realpath(SYSTEM_PYTHON)
    shipped = (REPO / "conf/capsule8-sensor.yaml").read_bytes()
    config = host.conf_before if host.conf_before is not None else shipped
    pid1 = check_running(host, config)
    # detections run by default, with the packaged rules
    assert "c8-detector" in [c["name"] for c in supervisor_json(host.run_dir)["children"]]
    host.sees_exec(f"c8-install-{uuid.uuid4().hex[:8]}")
    # What each child does after dropping privileges, done without any capability:
    # run the venv's interpreter and import the package from the venv.
    user = pwd.getpwnam("capsule8")
    probe = subprocess.run(
        ["setpriv", f"--reuid={user.pw_uid}", f"--regid={user.pw_gid}", "--clear-groups",
         f"{VENV}/bin/python", "-I", "-c",
         "import c8, c8.broker.main, c8.collectors.main, c8.detections.main; print(c8.__file__)"],
        cwd="/", capture_output=True, text=True, timeout=60)
    assert probe.returncode == 0 and probe.stdout.startswith(f"{VENV}/lib/"), probe.stderr
    verify = subprocess.run(["systemd-analyze", "verify", UNIT], capture_output=True, text=True,
                            timeout=60)
    assert verify.returncode == 0, verify.stdout + verify.stderr
    assert "c8-supervisor" not in verify.stdout + verify.stderr, verify.stdout + verify.stderr
    if SYSTEMD:
        assert unit_state("is-enabled") == "enabled" and unit_state("is-active") == "active"

    # Upgrade in place from newer code: the running sensor restarts on it, its
    # configuration (edited by the user) kept.
    if host.conf_before is None:
        config = shipped + b"\nlog_level: info  # edited after install\n"
        CONF.write_bytes(config)
    newer, version = upgraded_checkout(tmp_path / "newer")
    started = time.time()
    res = host.sh(cmd, cwd=newer, timeout=INSTALL_TIMEOUT)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "keeping the configuration" in res.stdout, res.stdout
    assert installed_version() == version
    assert not alive(pid1)
    pid2 = check_running(host, config)
    assert pid2 != pid1
    sup = supervisor_json(host.run_dir)
    # ctime: when the upgrade wrote (or chmod-ed) the file; no one can set it back.
    code = [p.stat().st_ctime for p in Path(VENV).glob("lib/python3*/site-packages/c8/**/*.py")]
    assert code and started <= min(code) and max(code) <= sup["started_unix"], \
        "the sensor was not restarted on the upgraded code"
    host.sees_exec(f"c8-upgrade-{uuid.uuid4().hex[:8]}")
    if host.conf_before is None:
        # A configuration the new code refuses: the running sensor is not stopped.
        CONF.write_bytes(config + b"no_such_key: 1\n")
        res = host.sh(cmd, cwd=newer, timeout=INSTALL_TIMEOUT)
        assert res.returncode == 1 and "no_such_key" in res.stderr, res.stdout + res.stderr
        CONF.write_bytes(config)
        assert check_running(host, config) == pid2

    # Uninstall: the sensor stops; venv, links and unit go; configuration and logs stay.
    children = [c["pid"] for c in sup["children"]]
    res = host.sh(f"{REPO}/scripts/install.sh --uninstall", cwd="/", timeout=120)
    assert res.returncode == 0, res.stdout + res.stderr
    assert not any(alive(p) for p in [pid2, *children])
    assert [p for p in INSTALLED if os.path.lexists(p)] == []
    assert not os.path.exists(host.run_dir)
    # Without systemd the supervisor logs to SUPERVISOR_LOG; under it, to the
    # journal, and the sensor id is kept in the default STATE_DIR.
    made = (CONF_DIR, STATE_DIR) if SYSTEMD else (CONF_DIR, SUPERVISOR_LOG)
    made += (LOG_DIR,)  # detections run by default: the alert file's directory stays with the logs
    kept = {d for d in made if not host.dirs_before[d]}
    assert traces() - host.traces_before == kept
    assert CONF.read_bytes() == config
    if not host.dirs_before[CONF_DIR]:
        assert os.listdir(CONF_DIR) == ["capsule8-sensor.yaml"]
    if SYSTEMD:
        assert unit_state("is-active") != "active"
    else:
        assert "stopped" in Path(SUPERVISOR_LOG).read_text()

    # --purge takes the kept files too; only done when none of them were there before.
    if not any(host.dirs_before.values()):
        res = host.sh(f"{REPO}/scripts/install.sh --uninstall --purge", cwd="/", timeout=120)
        assert res.returncode == 0, res.stdout + res.stderr
        assert traces() == host.traces_before
