"""System calls, user function calls and kernel function calls through the broker.

Syscalls: raw_syscalls with the id filter pushed into the kernel. User calls:
a uprobe/uretprobe on tests/integration/data/probe_target.c, created by
collector cpu0 when subscribed and removed after the last unsubscribe.
Kernel calls: this kernel has no kprobes, so the subscription is refused
clearly (UNSUPPORTED) and the rest of the sensor carries on.
"""

from __future__ import annotations

import errno
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from c8.clients.client import SensorError
from c8.probes import find_tracefs
from c8.protocol import errors
from tests.integration.sensor import wait_for

pytestmark = pytest.mark.root

DATA = Path(__file__).parent / "data"
CALLS = 25
FETCH = "a=%di:s32 b=%si:s64 s=+0(%dx):string"


def collect(sub, until, timeout=30.0, category=None):
    events = []
    deadline = time.monotonic() + timeout
    for ev in sub.events(timeout=3.0, idle=min(10.0, timeout)):
        if category is None or ev["type"] == category:
            events.append(ev)
        if until(events) or time.monotonic() > deadline:
            break
    return events


@pytest.fixture(scope="module")
def target(tmp_path_factory):
    gcc = shutil.which("gcc") or shutil.which("cc")
    if gcc is None:
        pytest.fail("needs a C compiler for the probe target")
    binary = tmp_path_factory.mktemp("probe_target") / "c8_probe_target"
    subprocess.run([gcc, "-O1", "-o", str(binary), str(DATA / "probe_target.c")], check=True)
    return str(binary)


def uprobe_events() -> str:
    return Path(find_tracefs(), "uprobe_events").read_text()


# -- syscalls --------------------------------------------------------------------------
def test_syscall_enter_exit_with_kernel_filter(shared_sensor):
    pid = 1234
    while os.path.exists(f"/proc/{pid}"):
        pid += 1  # a pid that does not exist: getpgid fails with ESRCH
    with shared_sensor.client.subscribe({"events": {"syscall": {"filter": "id == 121"}}}) as sub:
        plan = shared_sensor.status()["plan"]["tracepoints"]
        assert plan["raw_syscalls:sys_enter"]["filter"].startswith("(id == 121) && common_pid != ")
        assert plan["raw_syscalls:sys_exit"]["filter"].startswith("(id == 121) && common_pid != ")
        child = subprocess.Popen([sys.executable, "-c",
                                  f"import os\ntry:\n os.getpgid({pid})\nexcept ProcessLookupError:\n pass"])
        child.wait()
        events = collect(sub, lambda evs: sum(e["process_pid"] == child.pid for e in evs) >= 2)
    mine = [e for e in events if e["process_pid"] == child.pid]
    assert [e["kind"] for e in mine] == ["ENTER", "EXIT"]
    enter, exit_ = mine
    assert enter["id"] == exit_["id"] == 121  # the syscall number; the event id is event_id
    assert enter["arg0"] == pid
    assert exit_["ret"] == -errno.ESRCH
    assert enter["event_id"] != exit_["event_id"]
    assert all(e["id"] == 121 for e in events)  # the filter held for every process


# -- user calls ------------------------------------------------------------------------
def test_user_call_arguments_return_value_and_removal(shared_sensor, target):
    client = shared_sensor.client
    spec = {"user_call": [{"executable": target, "symbol": "c8_probe_target", "fetchargs": FETCH},
                          {"executable": target, "symbol": "c8_probe_target", "fetchargs": "ret=$retval:s32",
                           "return": True}]}
    with client.subscribe({"events": spec}) as sub:
        probes = shared_sensor.status()["plan"]["probes"]
        assert len(probes) == 2
        names = [n.replace(":", "/") for n in probes]  # c8probes:NAME -> c8probes/NAME
        wait_for(lambda: all(n in uprobe_events() for n in names), 10, what="uprobes created")
        run = subprocess.run([target, str(CALLS)], check=True)
        assert run.returncode == 0
        events = collect(sub, lambda evs: len(evs) >= 2 * CALLS, category="user_call")
    calls = [e for e in events if e["kind"] == "CALL"]
    rets = [e for e in events if e["kind"] == "RETURN"]
    assert [e["arguments"] for e in calls] == [
        {"a": i, "b": 10**12 + i, "s": f"c8-probe-{i % 10}"} for i in range(CALLS)]
    assert [e["arguments"] for e in rets] == [{"ret": 3 * i + 7} for i in range(CALLS)]
    pids = {e["process_pid"] for e in events}
    assert len(pids) == 1
    assert all(e["symbol"] == "c8_probe_target" and e["executable"] == target for e in events)
    # the probes go away with their last subscriber
    wait_for(lambda: not any(n in uprobe_events() for n in names), 15, 0.2, "uprobes removed")
    assert shared_sensor.status()["plan"]["probes"] == {}


def test_two_subscribers_same_probe_each_get_their_own(shared_sensor, target):
    client = shared_sensor.client

    def spec(flt):
        return {"events": {"user_call": [{"executable": target, "symbol": "c8_probe_target",
                                          "fetchargs": FETCH, "filter": flt}]}}
    with client.subscribe(spec("arg_a < 10")) as low, client.subscribe(spec("arg_a >= 10")) as high:
        probes = shared_sensor.status()["plan"]["probes"]
        assert len(probes) == 1  # one probe serves both
        subprocess.run([target, str(CALLS)], check=True)
        got_low = collect(low, lambda evs: len(evs) >= 10, category="user_call")
        got_high = collect(high, lambda evs: len(evs) >= CALLS - 10, category="user_call")
        # nothing more comes for either
        assert collect(low, lambda evs: False, timeout=1.5, category="user_call") == []
        assert collect(high, lambda evs: False, timeout=1.5, category="user_call") == []
    assert [e["arguments"]["a"] for e in got_low] == list(range(10))
    assert [e["arguments"]["a"] for e in got_high] == list(range(10, CALLS))


# -- kernel calls ----------------------------------------------------------------------
def test_kernel_call_unsupported_while_others_flow(shared_sensor):
    client = shared_sensor.client
    with client.subscribe({"events": {"process": {"filter": 'kind == "EXEC"'}}}) as procs:
        with pytest.raises(SensorError) as err:
            client.subscribe({"events": {"kernel_call": [
                {"symbol": "tcp_connect", "fetchargs": "dport=+12(%di):u16"}]}})
        assert err.value.code == errors.UNSUPPORTED
        assert "kprobe" in err.value.reason.lower()
        p = subprocess.Popen(["/bin/true", "still", "flowing"])
        p.wait()
        events = collect(procs, lambda evs: any(e["process_pid"] == p.pid for e in evs))
    ev = next(e for e in events if e["process_pid"] == p.pid)
    assert ev["exec_command_line"] == "/bin/true still flowing"
    assert "tcp_connect" not in str(shared_sensor.status()["plan"]["probes"])
