"""c8.probes against the real kernel: uprobes created, hit, read back, removed.

Events are read through a private ftrace instance (instances/<name>), so the
tests neither need the collectors nor disturb the global trace buffer. The
probed program is compiled from tests/integration/data/probe_target.c.
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from c8.probes import (
    GROUP,
    KprobesUnavailable,
    ensure,
    find_tracefs,
    kernel_probe,
    list_probes,
    probe_names,
    remove_all,
    user_probe,
)
from c8.probes.tracefs import _remove

pytestmark = pytest.mark.root

DATA = Path(__file__).parent / "data"
CALLS = 25
_EVENT = re.compile(r"-(\d+)\s+\[\d+\].*?: (\w+): \((0x[0-9a-f]+)(?: <- 0x[0-9a-f]+)?\)(.*)$")
_ARG = re.compile(r'(\w+)=("(?:[^"\\]|\\.)*"|\S+)')


@pytest.fixture(scope="module")
def tracefs():
    if os.geteuid() != 0:
        pytest.skip("needs root")
    root = find_tracefs(required=False)
    if root is None or not os.path.exists(os.path.join(root, "uprobe_events")):
        pytest.skip("no tracefs with uprobe_events")
    return root


@pytest.fixture(scope="module")
def target(tmp_path_factory):
    gcc = shutil.which("gcc") or shutil.which("cc")
    if gcc is None:
        pytest.skip("no C compiler")
    binary = tmp_path_factory.mktemp("probe_target") / "c8_probe_target"
    subprocess.run([gcc, "-O1", "-o", str(binary), str(DATA / "probe_target.c")], check=True)
    return str(binary)


@pytest.fixture
def instance(tracefs):
    """A private ftrace instance: its own buffer and event enables."""
    path = os.path.join(tracefs, "instances", f"c8test_{uuid.uuid4().hex[:8]}")
    os.mkdir(path)
    yield path
    for enable in Path(path, "events", GROUP).glob("*/enable"):
        enable.write_text("0")
    os.rmdir(path)


@pytest.fixture
def made(tracefs):
    """Names of probes a test creates; removed afterwards (only ours: others may share the host)."""
    names: list[str] = []
    yield names
    current = list_probes(tracefs)
    for name in names:
        if name in current:
            _remove(tracefs, name, "uprobe")
    assert not set(names) & set(probe_names(tracefs))


def enable(instance: str, name: str) -> None:
    Path(instance, "events", GROUP, name, "enable").write_text("1")


def run_target(target: str) -> int:
    """Run the probed program to completion; its pid, to pick its events."""
    proc = subprocess.Popen([target, str(CALLS)])
    assert proc.wait(timeout=30) == 0
    return proc.pid


def wait_for_events(instance: str, name: str, pid: int, count: int, timeout: float = 10.0) -> list[dict]:
    """Events of probe ``name`` by ``pid`` in the instance's buffer, once ``count`` are there."""
    deadline = time.monotonic() + timeout
    while True:
        events = []
        for line in Path(instance, "trace").read_text().splitlines():
            m = _EVENT.search(line)
            if m and m.group(2) == name and int(m.group(1)) == pid:
                events.append({k: v.strip('"') for k, v in _ARG.findall(m.group(4))})
        if len(events) >= count or time.monotonic() > deadline:
            return events
        time.sleep(0.05)


def test_uprobe_reads_register_and_string_arguments(tracefs, target, instance, made):
    d = user_probe(target, "c8_probe_target", "a=%di:s32 b=%si:s64 s=+0(%dx):string", False)
    made.append(d.name)
    assert ensure({d.name: d.line}, tracefs) == {d.name: None}
    enable(instance, d.name)
    events = wait_for_events(instance, d.name, run_target(target), CALLS)
    assert len(events) == CALLS
    assert [int(e["a"]) for e in events] == list(range(CALLS))
    assert [int(e["b"]) for e in events] == [10**12 + i for i in range(CALLS)]
    assert [e["s"] for e in events] == [f"c8-probe-{i % 10}" for i in range(CALLS)]


def test_uretprobe_reads_the_return_value(tracefs, target, instance, made):
    d = user_probe(target, "c8_probe_target", "ret=$retval:s32", True)
    made.append(d.name)
    assert d.line.startswith(f"r:{GROUP}/{d.name} ")
    assert ensure({d.name: d.line}, tracefs) == {d.name: None}
    enable(instance, d.name)
    events = wait_for_events(instance, d.name, run_target(target), CALLS)
    assert [int(e["ret"]) for e in events] == [3 * i + 7 for i in range(CALLS)]


def test_libc_connect_sockaddr(tracefs, instance, made):
    d = user_probe("libc.so.6", "connect",
                   "fd=%di:s32 family=+0(%si):u16 port=+2(%si):u16 addr=+4(%si):u32", False)
    made.append(d.name)
    assert ensure({d.name: d.line}, tracefs) == {d.name: None}
    enable(instance, d.name)
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(1)
        port = listener.getsockname()[1]
        client = subprocess.Popen(
            [sys.executable, "-c",
             f"import socket; socket.create_connection(('127.0.0.1', {port})).close()"])
        assert client.wait(timeout=30) == 0
        events = wait_for_events(instance, d.name, client.pid, 1)
    assert len(events) == 1
    (e,) = events
    assert int(e["fd"]) >= 0
    assert int(e["family"]) == socket.AF_INET
    # The sockaddr holds network byte order; the probe reads it as a little-endian u16/u32.
    assert int(e["port"]) == socket.htons(port)
    assert int(e["addr"]) == int.from_bytes(socket.inet_aton("127.0.0.1"), "little")


def test_ensure_adds_replaces_and_removes(tracefs, target, instance, made):
    a = user_probe(target, "c8_probe_target", "a=%di:s32", False)
    b = user_probe(target, "main", "argc=%di:s32", False)
    made.extend([a.name, b.name])
    assert ensure({a.name: a.line, b.name: b.line}, tracefs) == {a.name: None, b.name: None}
    assert {a.name, b.name} <= set(probe_names(tracefs))
    assert ensure({a.name: a.line, b.name: b.line}, tracefs) == {a.name: None, b.name: None}  # idempotent
    # Enabled probes are disabled before removal, else the kernel says EBUSY.
    enable(instance, b.name)
    assert ensure({a.name: a.line}, tracefs) == {a.name: None}
    assert b.name not in probe_names(tracefs)
    assert not Path(tracefs, "events", GROUP, b.name).exists()
    # Same name, new definition: the old probe is replaced.
    changed = a.line.replace("a=%di:s32", "a=%di:s64")
    assert ensure({a.name: changed}, tracefs) == {a.name: None}
    assert list_probes(tracefs)[a.name].endswith("a=%di:s64")


def test_ensure_reports_kernel_errors_by_name(tracefs, target, made):
    good = user_probe(target, "c8_probe_target", "", False)
    made.extend([good.name, "c8test_bad"])
    path, offset = good.line.split()[1].rsplit(":", 1)
    bad_line = f"p:{GROUP}/c8test_bad {path}:{offset} a=%di:u17"  # refused by the kernel, not by us
    result = ensure({good.name: good.line, "c8test_bad": bad_line, "c8test_x": "p:other/c8test_x /bin/sh:0x0"},
                    tracefs)
    assert result[good.name] is None
    assert result["c8test_bad"].startswith("Invalid argument (errno 22)")
    if os.path.exists(os.path.join(tracefs, "error_log")):
        assert "at 'u17'" in result["c8test_bad"]
    assert "is not c8probes/c8test_x" in result["c8test_x"]
    assert "c8test_bad" not in probe_names(tracefs)


def test_remove_all_leaves_no_c8probes_line(tracefs, target, instance):
    defs = [user_probe(target, "c8_probe_target", f"a=%di:s{bits}", ret)
            for bits in (32, 64) for ret in (False, True)]
    assert all(v is None for v in ensure({d.name: d.line for d in defs}, tracefs).values())
    enable(instance, defs[0].name)
    removed = remove_all(tracefs)
    assert {d.name for d in defs} <= set(removed)
    assert all(v is None for v in removed.values())
    assert probe_names(tracefs) == []
    text = Path(tracefs, "uprobe_events").read_text()
    assert f"{GROUP}/" not in text
    assert remove_all(tracefs) == {}


def test_kernel_probe_refused_clearly_without_kprobes(tracefs):
    if os.path.exists(os.path.join(tracefs, "kprobe_events")):
        pytest.skip("this kernel has kprobes")
    with pytest.raises(KprobesUnavailable, match=re.escape(
            f"kernel function probes need kprobes (CONFIG_KPROBES); this kernel has no {tracefs}/kprobe_events")):
        kernel_probe("tcp_connect", "dport=+12(%di):u16", False)
    # ensure refuses a kprobe line the same way, by name, and creates nothing.
    result = ensure({"kp_test": f"p:{GROUP}/kp_test tcp_connect"}, tracefs)
    assert "need kprobes" in result["kp_test"]
    assert "kp_test" not in probe_names(tracefs)
