"""Run children as sensor_user with only the capabilities the sensor needs.

The supervisor (root) makes sure the user exists and owns run_dir. In each
forked child, `drop_privileges` keeps capabilities across setuid
(PR_SET_KEEPCAPS), switches groups and uid, then sets the needed set as
permitted, effective and inheritable, and raises each as ambient so that
programs the child may exec keep them too (the recipe of `setpriv`).
Capabilities the bounding set lacks (CAP_SYS_RESOURCE here) are skipped.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import grp
import logging
import os
import pwd
import subprocess

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
    "CAP_SYS_PTRACE": 19,
    "CAP_SYS_ADMIN": 21,
    "CAP_SYS_RESOURCE": 24,
    "CAP_SYSLOG": 34,
    "CAP_PERFMON": 38,
    "CAP_BPF": 39,
}

# What a child keeps, and why.
NEEDED = (
    "CAP_PERFMON",          # perf_event_open of tracepoints on every CPU
    "CAP_BPF",              # loading the eBPF tracepoint programs and maps
    "CAP_SYS_ADMIN",        # tracefs probe writes, some perf ioctls, older kernels' perf/bpf
    "CAP_DAC_READ_SEARCH",  # tracefs is 0700 root; reading /proc of other users; root's Python
    "CAP_DAC_OVERRIDE",     # writing uprobe_events/kprobe_events and event filters
    "CAP_IPC_LOCK",         # perf rings above the mlock limit
    "CAP_SYS_PTRACE",       # /proc/<pid>/{exe,root,environ} of other users' processes
    "CAP_SYS_RESOURCE",     # raising rlimits (absent from the bounding set on some hosts)
    "CAP_KILL",             # signalling its own sibling processes whatever their uid
    "CAP_CHOWN",            # giving sockets under run_dir the group of sensor_user
    "CAP_FOWNER",           # chmod of sockets and files it did not create (Capsule8's list)
    "CAP_SYSLOG",           # kernel addresses in /proc/kallsyms for kprobes (Capsule8's list)
)

PR_SET_PDEATHSIG = 1
PR_SET_KEEPCAPS = 8
PR_CAP_AMBIENT = 47
PR_CAP_AMBIENT_RAISE = 2
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
    """{CapInh, CapPrm, CapEff, CapBnd, CapAmb: bitmask} from /proc/PID/status."""
    caps = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("Cap"):
                name, value = line.split(":", 1)
                caps[name] = int(value.strip(), 16)
    return caps


def mask(names: tuple[str, ...] | list[str]) -> int:
    """Capability names -> bitmask."""
    bits = 0
    for n in names:
        bits |= 1 << CAPS[n]
    return bits


def needed_mask(bounding: int | None = None) -> int:
    """The NEEDED set less what the bounding set lacks."""
    if bounding is None:
        bounding = status_caps()["CapBnd"]
    return mask(NEEDED) & bounding


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


def prepare_run_dir(path: str, uid: int, gid: int) -> None:
    """run_dir: owned by sensor_user and its group, mode 0750."""
    os.makedirs(path, exist_ok=True)
    os.chown(path, uid, gid)
    os.chmod(path, 0o750)


def group_name(gid: int) -> str:
    """The name of a group id (its number if it has none)."""
    try:
        return grp.getgrgid(gid).gr_name
    except KeyError:
        return str(gid)


def drop_privileges(uid: int, gid: int) -> int:
    """In a child: become uid/gid keeping the needed capabilities; returns their mask.

    Does nothing (returns the current effective set) when uid is 0.
    """
    if uid == 0:
        return status_caps()["CapEff"]
    want = needed_mask()
    _check(_prctl(PR_SET_KEEPCAPS, 1), "prctl(PR_SET_KEEPCAPS)")
    os.setgroups([])
    os.setgid(gid)
    os.setuid(uid)
    hdr = _CapHeader(_LINUX_CAPABILITY_VERSION_3, 0)
    data = (_CapData * 2)()
    for i in range(2):
        word = (want >> (32 * i)) & 0xFFFFFFFF
        data[i].effective = data[i].permitted = data[i].inheritable = word
    _check(_libc.capset(ctypes.byref(hdr), data), "capset")
    for n in NEEDED:
        if want & (1 << CAPS[n]):
            _check(_prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_RAISE, CAPS[n]),
                   f"prctl(PR_CAP_AMBIENT_RAISE, {n})")
    got = status_caps()
    if got["CapEff"] != want or got["CapAmb"] != want:
        raise PrivilegeError(f"capabilities after the drop are CapEff={got['CapEff']:#x} "
                             f"CapAmb={got['CapAmb']:#x}, expected {want:#x}")
    return want


def die_with_parent(sig: int) -> None:
    """Get `sig` when the parent (the supervisor) dies. Call after the uid change,
    which clears the setting."""
    _check(_prctl(PR_SET_PDEATHSIG, sig), "prctl(PR_SET_PDEATHSIG)")
