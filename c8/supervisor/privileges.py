"""Run children as sensor_user with only the capabilities their role needs.

The supervisor (root) makes sure the user exists and owns run_dir. In each
forked child, `drop_privileges` first shrinks the bounding set to the role's
capabilities (while still root), keeps them across setuid (PR_SET_KEEPCAPS),
switches groups and uid, sets them as permitted and effective only (nothing
inheritable or ambient: no program a child runs needs one), and sets
no_new_privs. ROLES is the one table of what each child keeps and why:
docs/security.md shows it (`markdown`, checked by tests/unit/test_privileges.py) and
tests/integration/test_privileges_sensor.py compares it with every running
child's /proc/<pid>/status. Each "why" names the call that failed here
without the capability (Linux 6.18, measured as sensor_user).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import grp
import logging
import os
import pwd
import subprocess
from dataclasses import dataclass

log = logging.getLogger("c8.supervisor.privileges")

CAPS = {
    "CAP_CHOWN": 0,
    "CAP_DAC_OVERRIDE": 1,
    "CAP_DAC_READ_SEARCH": 2,
    "CAP_FOWNER": 3,
    "CAP_KILL": 5,
    "CAP_SETGID": 6,
    "CAP_SETUID": 7,
    "CAP_SETPCAP": 8,
    "CAP_IPC_LOCK": 14,
    "CAP_SYS_MODULE": 16,
    "CAP_SYS_PTRACE": 19,
    "CAP_SYS_ADMIN": 21,
    "CAP_SYS_RESOURCE": 24,
    "CAP_SYSLOG": 34,
    "CAP_PERFMON": 38,
    "CAP_BPF": 39,
}


@dataclass(frozen=True)
class Grant:
    """One capability a role keeps, and the measured call that needs it."""

    cap: str
    why: str


_TRACEFS_READ = Grant("CAP_DAC_READ_SEARCH",
                      "tracefs is 0700 root: reading events/*/id and format (EACCES without); "
                      "the interpreter may sit in a root-only directory "
                      "(/root/.pyenv here: lazy imports fail without)")
_PERF = Grant("CAP_PERFMON", "perf_event_open of system-wide tracepoint and bpf-output events "
                             "(EACCES without; perf_event_paranoid 2)")
_IPC_LOCK = Grant("CAP_IPC_LOCK", "mmap of rings beyond RLIMIT_MEMLOCK and perf_event_mlock_kb "
                                  "(a 4096-page ring gets EPERM without, here)")

# What each child keeps. Keys are roles (ChildSpec.role); ROLE_TITLES names them.
ROLES: dict[str, tuple[Grant, ...]] = {
    "broker": (
        Grant("CAP_SYS_PTRACE", "readlink of /proc/<pid>/exe, cwd, root and fd/<n> of other "
                                "users' processes: relative file names, executables, runtime "
                                "roots (EACCES without)"),
        Grant("CAP_DAC_READ_SEARCH", "container runtime state (/run/runc, <docker data-root>: "
                                     "0700/0710 root); /proc/<pid>/fd/ of other users (0500: "
                                     "readlink of fd/<n> needs this and CAP_SYS_PTRACE); tracefs "
                                     "and ELF files when validating probes; root-only interpreter"),
    ),
    "collector0": (
        _PERF,
        Grant("CAP_BPF", "bpf(BPF_MAP_CREATE) and bpf(BPF_PROG_LOAD) of the eBPF tracepoint "
                         "programs, with CAP_PERFMON for PERF_EVENT_IOC_SET_BPF (EPERM without)"),
        _IPC_LOCK,
        Grant("CAP_DAC_OVERRIDE", "writing uprobe_events/kprobe_events (0640 root) to create "
                                  "and remove the c8probes probes (EACCES without); it also "
                                  "serves the reads CAP_DAC_READ_SEARCH serves the other "
                                  "collectors, which is therefore not kept"),
    ),
    "collector": (_PERF, _IPC_LOCK, _TRACEFS_READ),
    "detector": (
        Grant("CAP_DAC_READ_SEARCH", "reading the rule files root configured wherever they are, "
                                     "and a root-only interpreter"),
    ),
    "exporter": (
        Grant("CAP_DAC_READ_SEARCH", "reading the NATS credentials, nkey seed and TLS files "
                                     "root configured (0600 root), and a root-only interpreter; "
                                     "its spool is sensor_user's own"),
    ),
}
ROLE_TITLES = {
    "broker": "c8-broker",
    "collector0": "c8-collector cpu0, or cpu0-N (eBPF and probe owner)",
    "collector": "the other collectors (c8-collector cpuN)",
    "detector": "c8-detector",
    "exporter": "c8-exporter",
}
# Left out (Capsule8's list had them, or a child once kept them), and why.
REFUSED = {
    "CAP_SYS_ADMIN": "no call needs it where CAP_PERFMON and CAP_BPF exist (Linux 5.8+); "
                     "on older kernels it stands in for them",
    "CAP_SYS_RESOURCE": "not in root's bounding set here; rlimits are never raised",
    "CAP_KILL": "children signal only themselves; the supervisor (root) signals them",
    "CAP_CHOWN": "sockets are made by sensor_user with its own group already",
    "CAP_FOWNER": "children chmod only files they created",
    "CAP_SYSLOG": "kprobes are placed by symbol name: kallsyms addresses are not needed",
    "CAP_DAC_OVERRIDE": "kept by collector cpu0 alone (probe control files); the broker's "
                        "Docker API fallback would need it to connect to docker.sock (0660 root), "
                        "so it works only where sensor_user may reach the socket: the broker "
                        "reads <data-root>/containers/<id>/config.v2.json instead",
    "CAP_SETUID, CAP_SETGID, CAP_SETPCAP": "the switch to sensor_user happens before the "
                                           "child's code runs",
}
# Before Linux 5.8 (cap_last_cap < 39) perf and bpf need CAP_SYS_ADMIN instead.
_SYS_ADMIN_STANDS_IN_FOR = ("CAP_PERFMON", "CAP_BPF")

PR_SET_PDEATHSIG = 1
PR_SET_KEEPCAPS = 8
PR_CAPBSET_DROP = 24
PR_SET_NO_NEW_PRIVS = 38
PR_CAP_AMBIENT = 47
PR_CAP_AMBIENT_CLEAR_ALL = 4
_LINUX_CAPABILITY_VERSION_3 = 0x20080522


class PrivilegeError(Exception):
    """The user cannot be made or the privileges cannot be dropped as asked."""


class _CapHeader(ctypes.Structure):
    _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]


class _CapData(ctypes.Structure):
    _fields_ = [("effective", ctypes.c_uint32), ("permitted", ctypes.c_uint32),
                ("inheritable", ctypes.c_uint32)]


_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)


def _check(rc: int, what: str) -> None:
    if rc != 0:
        err = ctypes.get_errno()
        raise PrivilegeError(f"{what} failed: {os.strerror(err)}")


def _prctl(option: int, a2: int = 0, a3: int = 0, a4: int = 0, a5: int = 0) -> int:
    return _libc.prctl(option, ctypes.c_ulong(a2), ctypes.c_ulong(a3),
                       ctypes.c_ulong(a4), ctypes.c_ulong(a5))


def status_caps(pid: int | str = "self") -> dict[str, int]:
    """{CapInh, CapPrm, CapEff, CapBnd, CapAmb: bitmask, NoNewPrivs: 0|1} from /proc/PID/status."""
    caps = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("Cap"):
                name, value = line.split(":", 1)
                caps[name] = int(value.strip(), 16)
            elif line.startswith("NoNewPrivs:"):
                caps["NoNewPrivs"] = int(line.split(":", 1)[1])
    return caps


def mask(names: tuple[str, ...] | list[str]) -> int:
    """Capability names -> bitmask."""
    bits = 0
    for n in names:
        bits |= 1 << CAPS[n]
    return bits


def cap_last_cap() -> int:
    """The highest capability number this kernel knows."""
    try:
        with open("/proc/sys/kernel/cap_last_cap") as f:
            return int(f.read())
    except (OSError, ValueError):
        return CAPS["CAP_BPF"]


def role_caps(role: str, last_cap: int | None = None) -> tuple[str, ...]:
    """The capability names `role` keeps on this kernel (see ROLES).

    Raises KeyError for an unknown role. Where the kernel lacks CAP_PERFMON or
    CAP_BPF (before 5.8), CAP_SYS_ADMIN replaces them.
    """
    last = cap_last_cap() if last_cap is None else last_cap
    names = [g.cap for g in ROLES[role]]
    if any(CAPS[n] > last for n in names if n in _SYS_ADMIN_STANDS_IN_FOR):
        names = [n for n in names if CAPS[n] <= last] + ["CAP_SYS_ADMIN"]
    return tuple(names)


def role_mask(role: str, bounding: int | None = None) -> int:
    """The mask of role_caps(role), less what root's bounding set lacks."""
    if bounding is None:
        bounding = status_caps()["CapBnd"]
    return mask(role_caps(role)) & bounding


def expected_status(role: str, bounding: int | None = None) -> dict[str, int]:
    """The /proc/<pid>/status values a running child of `role` must show."""
    want = role_mask(role, bounding)
    return {"CapInh": 0, "CapPrm": want, "CapEff": want, "CapBnd": want, "CapAmb": 0,
            "NoNewPrivs": 1}


def markdown() -> str:
    """The generated part of docs/security.md, "Capabilities per child": the ROLES
    table and the REFUSED list (tests/unit/test_privileges.py checks the doc holds it)."""
    lines = ["| child | capability | why (the call that fails without it) |",
             "|---|---|---|"]
    for role, grants in ROLES.items():
        for i, g in enumerate(grants):
            lines.append(f"| {ROLE_TITLES[role] if i == 0 else ''} | {g.cap} | {g.why} |")
    lines += ["", "Left out, and why:", ""]
    lines += [f"- {cap}: {why}" for cap, why in REFUSED.items()]
    return "\n".join(lines) + "\n"


def ensure_user(name: str) -> tuple[int, int]:
    """(uid, gid) of `name`, creating it as a system user with no login shell if missing."""
    try:
        pw = pwd.getpwnam(name)
        return pw.pw_uid, pw.pw_gid
    except KeyError:
        pass
    cmd = ["useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin", name]
    try:
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise PrivilegeError(f"sensor_user {name!r} does not exist and useradd failed: {e}") from None
    if res.returncode != 0:
        reason = (res.stderr or res.stdout).strip() or f"exit status {res.returncode}"
        raise PrivilegeError(f"sensor_user {name!r} does not exist and cannot be created: {reason}")
    log.info("created system user %s", name)
    pw = pwd.getpwnam(name)
    return pw.pw_uid, pw.pw_gid


def group_name(gid: int) -> str:
    """The name of a group id (its number if it has none)."""
    try:
        return grp.getgrgid(gid).gr_name
    except KeyError:
        return str(gid)


def drop_privileges(uid: int, gid: int, want: int) -> int:
    """In a child: keep only the capabilities in mask `want`, become uid/gid, set
    no_new_privs; returns `want`. The result is checked against /proc/self/status.

    With uid 0 the uid stays, but the capability sets are reduced all the same.
    """
    # The bounding set first, while CAP_SETPCAP is still effective.
    for cap in range(cap_last_cap() + 1):
        if not want & (1 << cap):
            _check(_prctl(PR_CAPBSET_DROP, cap), f"prctl(PR_CAPBSET_DROP, {cap})")
    _check(_prctl(PR_SET_KEEPCAPS, 1), "prctl(PR_SET_KEEPCAPS)")
    if uid != 0:
        os.setgroups([])
        os.setgid(gid)
        os.setuid(uid)
    _check(_prctl(PR_SET_KEEPCAPS, 0), "prctl(PR_SET_KEEPCAPS, 0)")
    hdr = _CapHeader(_LINUX_CAPABILITY_VERSION_3, 0)
    data = (_CapData * 2)()
    for i in range(2):
        word = (want >> (32 * i)) & 0xFFFFFFFF
        data[i].effective = data[i].permitted = word
        data[i].inheritable = 0
    _check(_libc.capset(ctypes.byref(hdr), data), "capset")
    _check(_prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL), "prctl(PR_CAP_AMBIENT_CLEAR_ALL)")
    _check(_prctl(PR_SET_NO_NEW_PRIVS, 1), "prctl(PR_SET_NO_NEW_PRIVS)")
    got = status_caps()
    expected = {"CapInh": 0, "CapPrm": want, "CapEff": want, "CapBnd": want, "CapAmb": 0,
                "NoNewPrivs": 1}
    wrong = {k: got.get(k) for k, v in expected.items() if got.get(k) != v}
    if wrong:
        raise PrivilegeError(f"after the drop {wrong}, expected {want:#x} "
                             "(CapInh, CapAmb 0, NoNewPrivs 1)")
    return want


def die_with_parent(sig: int) -> None:
    """Get `sig` when the parent (the supervisor) dies. Call after the uid change,
    which clears the setting."""
    _check(_prctl(PR_SET_PDEATHSIG, sig), "prctl(PR_SET_PDEATHSIG)")
