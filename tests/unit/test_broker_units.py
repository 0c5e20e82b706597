"""Broker pieces on synthetic batches: merge order, sockaddr decoding, specs, builders."""

import socket
import struct

import numpy as np
import pytest

from c8 import schema
from c8.broker import catalog, sockaddr
from c8.broker.merge import Merger
from c8.broker.processes import ProcessTable, make_process_id, read_stat
from c8.broker.sequence import Sequence
from c8.broker.subscriptions import parse_spec
from c8.protocol import errors
from c8.supervisor.config import child_config


def batch(category, times, **cols):
    b = schema.empty(category, len(times))
    b["sensor_monotime_nanos"] = times
    for k, v in cols.items():
        b[k] = v
    return b


def test_merge_orders_across_cpus_and_numbers_gap_free():
    m = Merger(holdback_ns=100)
    seq = Sequence()
    m.add("process", batch("process", [10, 30, 50], cpu=0))
    m.add("syscall", batch("syscall", [20, 40, 500], cpu=1))
    m.add("process", batch("process", [15, 600], cpu=1))
    out = m.release(now_ns=300)
    seq.number(out)
    assert list(out["process"]["sensor_monotime_nanos"]) == [10, 15, 30, 50]
    assert list(out["syscall"]["sensor_monotime_nanos"]) == [20, 40]
    allseq = sorted(np.concatenate([out[c]["sensor_sequence_number"] for c in out]).tolist())
    assert allseq == [1, 2, 3, 4, 5, 6]
    # sequence follows time across categories
    assert out["syscall"]["sensor_sequence_number"].tolist() == [3, 5]
    rest = m.release(now_ns=10_000)
    seq.number(rest)
    assert rest["syscall"]["sensor_sequence_number"].tolist() == [7]
    assert rest["process"]["sensor_sequence_number"].tolist() == [8]
    assert m.late == 0


def test_merge_counts_late_events():
    m = Merger(holdback_ns=0)
    m.add("process", batch("process", [100]))
    m.release(200)
    m.add("process", batch("process", [150]))
    m.release(300)
    assert m.late == 1


def sa_in(ip, port):
    return struct.pack("<H", socket.AF_INET) + struct.pack(">H", port) + socket.inet_aton(ip)


def sa_in6(ip, port):
    return struct.pack("<H", socket.AF_INET6) + struct.pack(">H", port) + b"\0" * 4 + socket.inet_pton(socket.AF_INET6, ip) + b"\0" * 4


def sa_un(path: bytes):
    return struct.pack("<H", socket.AF_UNIX) + path


def test_sockaddr_decode_families():
    raws = [sa_in("127.0.0.1", 8080), sa_in6("::1", 443), sa_un(b"/run/x.sock\0"), sa_un(b"\0abstract"),
            sa_in("127.0.0.1", 8080), b""]
    lens = [16, 28, 14, 11, 16, 0]
    arr = np.zeros((len(raws), 112), np.uint8)
    for i, r in enumerate(raws):
        arr[i, :len(r)] = np.frombuffer(r, np.uint8)
    fam, addr, port, raw = sockaddr.decode(arr, np.array(lens))
    assert fam.tolist() == [2, 10, 1, 1, 2, 0]
    assert addr.tolist() == [b"127.0.0.1", b"::1", b"/run/x.sock", b"@abstract", b"127.0.0.1", b""]
    assert port.tolist() == [8080, 443, 0, 0, 8080, 0]
    assert raw[0] == socket.htons(8080)


def test_spec_errors_name_the_problem():
    with pytest.raises(errors.ProtocolError, match="unknown event type 'procss'"):
        parse_spec({"events": {"procss": {}}}, b"p")
    with pytest.raises(errors.ProtocolError, match="modifiers.rate"):
        parse_spec({"events": {"process": {}}, "modifiers": {"rate": -1}}, b"p")
    with pytest.raises(errors.ProtocolError) as e:
        parse_spec({"events": {"file": {"filter": "filename like"}}}, b"p")
    assert e.value.code == errors.BAD_FILTER
    with pytest.raises(errors.ProtocolError, match="kinds"):
        parse_spec({"events": {"syscall": {"kinds": ["BOGUS"]}}}, b"p")
    with pytest.raises(errors.ProtocolError, match="spec must be a map"):
        parse_spec([1, 2], b"p")


def test_rate_and_total_caps():
    sub = parse_spec({"events": {"process": {}}, "modifiers": {"rate": 10, "limit": 25}}, b"p")
    assert sub.admit(100, now=sub._tokens_at) == 10      # a full bucket at first
    assert sub.admit(100, now=sub._tokens_at + 0.5) == 5  # half a second refills half
    sub.sent = 24
    assert sub.admit(100, now=sub._tokens_at + 10) == 1   # the total cap bounds it
    sub.sent = 25
    assert sub.finished


def test_container_filter_excludes_host():
    sub = parse_spec({"events": {"process": {}}, "containers": {"image": "busy*"}}, b"p")
    b = batch("process", [1, 2, 3], container=[0, 1, 2])
    table = {0: ("", "", "", "", ""), 1: ("a" * 64, "/x", "sha256:1", "busybox", "docker"),
             2: ("b" * 64, "/y", "sha256:2", "alpine", "docker")}
    assert sub.container_mask(b, table).tolist() == [False, True, False]


def test_builders_syscall_and_exit_codes():
    raw = np.zeros(2, [("time", "u8"), ("cpu", "u4"), ("pid", "i4"), ("tid", "i4"), ("id", "i8"), ("args", "u8", (6,))])
    raw["id"] = [39, 59]
    raw["args"][1] = [1, 2, 3, 4, 5, 6]
    [(cat, out)] = catalog.build_sys_enter(raw)
    assert cat == "syscall" and out["arg5"].tolist() == [0, 6] and out["id"].tolist() == [39, 59]
    codes = np.array([3 << 8, 9, 0x80 | 11])
    out = schema.empty("process", 3)
    catalog.split_exit_code(codes, out)
    assert out["exit_status"].tolist() == [3, 0, 0]
    assert out["exit_signal"].tolist() == [0, 9, 11]
    assert out["exit_core_dumped"].tolist() == [0, 0, 1]


def test_process_table_identity(tmp_path):
    import os
    pt = ProcessTable(threaded=False)  # lookups inline: the miss's answer is there at collect
    assert pt.get(os.getpid()) is None  # a miss: looked up beside the loop, applied at collect
    pt.collect()
    me = pt.get(os.getpid())
    start = read_stat(os.getpid())[0]
    assert me.process_id == make_process_id(pt.boot, os.getpid(), start)
    b = batch("syscall", [1, 2], process_pid=[os.getpid(), 0])
    pt.fill(b)
    assert b["process_id"].tolist() == [me.process_id, b""]
    assert b["uid"][0] == os.getuid()


def test_a_batch_that_fails_to_build_is_reported_lost(tmp_path):
    from c8.broker.main import Broker
    from c8.protocol import batch as wire

    b = Broker(child_config(run_dir=str(tmp_path), sensor_id_file=str(tmp_path / "id")))
    # a bpf:sock batch without its record fields: the builder raises
    raw = np.zeros(7, [("time", "<u8"), ("cpu", "<u4"), ("pid", "<i4"), ("tid", "<i4"), ("nr", "<i4")])
    raw["pid"] = 999_999
    frames = [bytes(f) for f in wire.pack({"kind": "samples", "cpu": 1, "source": "bpf:sock", "watermark": 5}, raw)]
    b._ingest(frames)
    lost = b.merger.release(0, flush=True)["lost"]
    assert lost["count"].tolist() == [7] and lost["source"].tolist() == [b"broker"]
    assert b.counts["lost_broker"] == 7


def test_a_mkdir_read_after_the_containers_rmdir_is_applied_before_it(tmp_path):
    """Cgroup mkdirs and rmdirs are applied in time order at release, not as they
    arrive: a mkdir that one CPU's collector sends after another CPU's rmdir of the
    same container (a busy host) makes no second life. One CREATED, one DESTROYED,
    in time order (CI once saw CREATED, RUNNING, CREATED, EXITED, DESTROYED)."""
    from c8 import schema
    from c8.broker.main import Broker
    from c8.protocol import batch as wire

    cid = "c1d97cf26b2b" + "0" * 52
    b = Broker(child_config(run_dir=str(tmp_path), sensor_id_file=str(tmp_path / "id")))

    def cgroup(source: str, cpu: int, times: list[int], path: str) -> None:
        raw = np.zeros(len(times), [("time", "<u8"), ("cpu", "<u4"), ("pid", "<i4"), ("tid", "<i4"),
                                    ("root", "<i4"), ("id", "<u8"), ("level", "<i4"), ("path", "S256")])
        raw["time"], raw["cpu"], raw["pid"], raw["tid"], raw["path"] = times, cpu, 31508, 31508, path.encode()
        b._ingest([bytes(f) for f in wire.pack({"kind": "samples", "cpu": cpu, "source": source}, raw)])

    cgroup("cgroup:cgroup_mkdir", 0, [1000], f"/{cid}")           # the first hierarchy
    cgroup("cgroup:cgroup_rmdir", 1, [5000, 5001], f"/{cid}")     # arrives first ...
    cgroup("cgroup:cgroup_mkdir", 0, [1600, 1700], f"/{cid}")     # ... of what came before it
    window = b.merger.release(0, flush=True)
    b._cgroup_changes(window)
    assert catalog.CGROUP_CHANGES not in window
    ev = window["container"]
    assert ev["kind"].tolist() == [schema.kind_code("container", "CREATED"),
                                   schema.kind_code("container", "DESTROYED")]
    assert ev["sensor_monotime_nanos"].tolist() == [1000, 5000] and ev["container"][0] == ev["container"][1] > 0


# -- file rows held narrow ------------------------------------------------------------
def _open_records(pid: int, names: list[bytes], t0: int) -> np.ndarray:
    """bpf:open records as the collectors send them."""
    from c8.collectors.bpf import records
    rdt = records.RECORDS["open"][1]
    raw = np.zeros(len(names), [("time", "<u8"), ("cpu", "<u4"), ("pid", "<i4"), ("tid", "<i4"),
                                *[(n, rdt.fields[n][0]) for n in rdt.names]])
    raw["time"] = t0 + np.arange(len(names))
    raw["pid"] = raw["tid"] = pid
    raw["filename"] = names
    raw["dirfd"], raw["nr"], raw["ret"] = -100, 257, -2
    return raw


def test_every_name_length_reaches_a_subscriber_whole(broker):
    """File rows hold each name only as wide as its batch needs (catalog.file_base): two
    collector batches of different name widths, merged into one window, then sent.
    Every name and path from 1 to 255 bytes arrives exactly; the batches a subscriber
    gets concatenate (string fields as wide as their values, at most declared)."""
    import msgpack

    from c8.protocol import batch as wire

    b = broker
    b.own_pids = set()
    b._handle([b"u\x00peer", msgpack.packb({"id": 1, "command": "subscribe", "properties": {
        "events": {"file": {"filter": 'kind == "OPEN"'}}}})])
    b._send_ready_replies(float("inf"))
    short = [b"/" + b"s" * (k % 7) for k in range(50)]  # held 8 bytes wide
    long = [b"/" + b"x" * k for k in range(254)]          # up to 256
    for cpu, names in ((0, short), (1, long)):
        raw = _open_records(1, names, 1000 + 10_000 * cpu)
        b._ingest([bytes(f) for f in wire.pack({"kind": "samples", "cpu": cpu, "source": "bpf:open"}, raw)])
    b._release(0, flush=True)
    got = []
    for frames in b.control.sent:
        msg = msgpack.unpackb(frames[-1], raw=False, strict_map_key=False)
        for part in msg.get("batches", []) if isinstance(msg, dict) else []:
            if part.get("category") == "file":
                got.append(wire.decode_columns(part))
    assert got, b.control.sent
    events = np.concatenate(got)
    declared = schema.dtype("file")
    assert events.dtype.names == declared.names
    assert all(events.dtype[n].itemsize <= declared[n].itemsize for n in declared.names)
    assert events["filename"].tolist() == short + long
    assert events["path"].tolist() == short + long  # init's root is /


def test_narrow_rows_concatenate_and_widen_without_losing_a_byte():
    from c8.schema import rows
    declared = schema.dtype("file")
    a = catalog.file_base(_open_records(1, [b"/a"], 1), "OPEN", filename=np.array([b"/a"]))
    c = catalog.file_base(_open_records(1, [b"/" + b"b" * 100], 2), "OPEN",
                          filename=np.array([b"/" + b"b" * 100]))
    assert a.dtype["filename"].itemsize == rows.MIN_WIDTH and c.dtype["filename"].itemsize == 128
    assert a.dtype["oldname"].itemsize == rows.MIN_WIDTH and a.dtype["process_exec_filename"].itemsize == 256
    both = rows.concat([a, c])
    assert both["filename"].tolist() == [b"/a", b"/" + b"b" * 100]
    wide = rows.widen(both, declared, ("path", "oldpath"))
    assert wide.dtype["path"].itemsize == 256 and wide.dtype["filename"].itemsize == 128
    assert wide.tobytes() != both.tobytes() and all(
        (wide[n] == both[n]).all() for n in both.dtype.names)
    assert rows.widen(wide, declared, ("path",)) is wide  # already wide: no copy
    assert [rows.width_for(u, 256) for u in (0, 1, 8, 9, 16, 17, 200, 256)] == [8, 8, 8, 16, 16, 32, 256, 256]


def test_batch_layouts_kept_are_bounded_whatever_names_processes_choose():
    """Name lengths are the monitored processes' choice, and each mix of widths is a
    layout: every one of the 7,776 mixes is made, and the caches stay bounded."""
    import itertools

    from c8.schema import rows
    widths = [8, 16, 32, 64, 128, 256]
    for combo in itertools.product(widths, repeat=len(catalog.FILE_NAMES)):
        a = schema.empty("file", 1, dict(zip(catalog.FILE_NAMES, combo, strict=True)))
        assert a["uid"][0] == -1 and a.dtype["path"].itemsize == combo[1]
    from c8.schema.fields import _blank
    assert rows._with_widths.cache_info().currsize <= rows.LAYOUTS_KEPT
    assert _blank.cache_info().currsize <= rows.LAYOUTS_KEPT
