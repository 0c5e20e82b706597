"""c8ctl's JSON lines and the client's event dicts keep their shape, and come in sequence order.

The reference below is the per-event formatter c8ctl and ``events()`` used
before the column-wise one (c8/clients/client.py at d764fd4): the contract
for keys, their order and values. Batches travel the real wire encoding
(broker ``columns`` -> msgpack -> client ``decode_columns``) first.
"""

from __future__ import annotations

import hashlib
import json

import msgpack
import numpy as np
import pytest

from c8 import schema
from c8.clients import jsonlines
from c8.clients.client import to_dicts
from c8.protocol import batch as wire

SENSOR = "f" * 64


# -- the reference: the formatter as it was -------------------------------------
def ref_event_id(sensor_id, seq, monotime):
    return hashlib.sha256(f"{sensor_id}{seq}{monotime}".encode()).hexdigest()


def ref_to_dicts(category, arr, table, sensor_id=""):
    names = arr.dtype.names
    cols = {n: arr[n].tolist() for n in names}
    out = []
    kinds = schema.KINDS.get(category, ())
    arg_names = [n for n in names if n.startswith(schema.ARGUMENT_PREFIX)]
    for i in range(len(arr)):
        ev = {"type": category}
        for n in names:
            if n in arg_names:
                continue
            v = cols[n][i]
            ev[n] = v.decode(errors="replace") if isinstance(v, bytes) else v
        ev["kind"] = kinds[ev["kind"] - 1] if 0 < ev.get("kind", 0) <= len(kinds) else str(ev.get("kind"))
        row = table.get(ev.get("container", 0)) or ("", "", "", "", "")
        ev["container_id"], ev["container_name"], ev["image_id"], ev["image_name"] = row[:4]
        # Kubernetes identity (rows without these slots, as older sensors send: outside a pod)
        pod = row[5:10] if len(row) >= 10 else ("", "", "", "", {})
        (ev["k8s_namespace"], ev["k8s_pod_name"], ev["k8s_pod_uid"], ev["k8s_container_name"],
         ev["k8s_labels"]) = pod
        if category == "container":
            ev["name"], ev["image_id"], ev["image_name"] = row[1], row[2], row[3]
        if "process_id" in names:  # ancestors from the batch's lineage table (none here: [])
            ev["process_lineage"] = wire.Tables(table, getattr(table, "processes", None)).lineage(ev["process_id"])
        ev["sensor_id"] = sensor_id
        eid = ref_event_id(sensor_id, ev.get("sensor_sequence_number", 0), ev.get("sensor_monotime_nanos", 0))
        ev["event_id"] = eid
        if "id" not in ev:
            ev["id"] = eid
        if arg_names:
            ev["arguments"] = {n[len(schema.ARGUMENT_PREFIX):]: (cols[n][i].decode(errors="replace")
                               if isinstance(cols[n][i], bytes) else cols[n][i]) for n in arg_names}
        out.append(ev)
    return out


def ref_line(ev) -> str:
    return json.dumps(ev, default=str)


# -- batches ----------------------------------------------------------------------
TEXTS = [b"", b"/usr/bin/true", "/tmp/caf\u00e9-\u6f22\u5b57".encode(), b"bad \xff\xfe utf8",
         b"mid\x00nul", b"x" * 255, b"quote\" back\\slash\ttab\nnl", b"\x01\x7f ctl"]
TABLE = {1: ("c1" * 32, "web", "sha256:" + "a" * 64, "busybox:latest", "docker"),  # an older sensor's row
         2: ("c2" * 32, "caf\u00e9", "", "", "runc", "prod", "web-7d4b9", "0d2c6f6a-1b2c-4d5e-8f90-123456789abc",
             "nginx", {"app": "web", "tier": "front\"end"})}


PLAIN_TEXTS = [b"", b"/usr/bin/true", b"x" * 255, b"a b=c,d:{e}[f]"]  # nothing to escape


def batch(category: str, n: int, seed: int, extra: list | None = None, texts: list = TEXTS) -> np.ndarray:
    rng = np.random.default_rng(seed)
    dt = schema.dtype(category)
    if extra:
        dt = np.dtype(dt.descr + extra)
    arr = np.zeros(n, dt)
    for name in dt.names:
        col = arr[name]
        if col.dtype.kind == "S":
            arr[name] = [texts[i][:col.dtype.itemsize] for i in rng.integers(0, len(texts), n)]
        elif col.dtype.kind in "iu":
            info = np.iinfo(col.dtype)
            arr[name] = rng.integers(info.min, info.max, n, dtype=col.dtype, endpoint=True)
        else:
            arr[name] = rng.random(col.shape)
    kinds = len(schema.KINDS[category])
    arr["kind"] = rng.integers(0, kinds + 2, n)  # 0 and past the end: unnamed kinds
    arr["container"] = rng.integers(0, 4, n)    # 3: not in the table
    arr["sensor_sequence_number"] = np.sort(rng.choice(10**6, n, replace=False)) + 1
    return arr


def over_the_wire(category: str, arr: np.ndarray, **extra) -> tuple[str, np.ndarray, dict]:
    msg = msgpack.unpackb(msgpack.packb(wire.columns(category, arr, containers={k: list(v) for k, v in TABLE.items()}, **extra),
                                        use_bin_type=True), raw=False, strict_map_key=False)
    return category, wire.decode_columns(msg), {int(k): tuple(v) for k, v in msg["containers"].items()}


CASES = [(c, []) for c in schema.CATEGORIES if c not in ("kernel_call", "user_call")] + [
    ("kernel_call", [("arg_fd", "<i4"), ("arg_name", "S32"), ("arg_ret", "<u8")]),
    ("user_call", [("arg_path", "S64")]),
]


@pytest.mark.parametrize(("category", "extra"), CASES, ids=[c for c, _ in CASES])
@pytest.mark.parametrize(("seed", "n", "same", "texts"), [(1, 300, False, TEXTS), (2, 300, False, PLAIN_TEXTS),
                                                           (3, 1, False, TEXTS), (4, 50, True, TEXTS)],
                         ids=["varied", "plain", "one", "alike"])
def test_dicts_and_lines_are_the_reference_shape(category, extra, seed, n, same, texts):
    arr = batch(category, n, seed, extra, texts)
    if same:  # every column alike but the number: the lines path writes them as literal text
        seq = arr["sensor_sequence_number"].copy()
        arr[:] = arr[0]
        arr["sensor_sequence_number"] = seq
    _, arr, table = over_the_wire(category, arr)
    want = ref_to_dicts(category, arr, table, SENSOR)
    got = to_dicts(category, arr, table, SENSOR)
    assert got == want
    assert [list(d) for d in got] == [list(d) for d in want]  # key order too
    lines = jsonlines.lines(category, arr, table, SENSOR)
    assert all(ln.endswith(b"\n") and ln.count(b"\n") == 1 for ln in lines)
    parsed = [json.loads(ln) for ln in lines]
    ref = [json.loads(ref_line(ev)) for ev in want]
    assert parsed == ref
    assert [list(p) for p in parsed] == [list(r) for r in ref]


def test_values_that_matter_by_hand():
    arr = schema.empty("process", 2)
    arr["sensor_sequence_number"] = [7, 8]
    arr["sensor_monotime_nanos"] = [2**64 - 1, 5]
    arr["kind"] = [2, 9]
    arr["container"] = [1, 0]
    arr["exec_command_line"] = ["/bin/caf\u00e9 \u00ff".encode(), b"\xff"]
    _, arr, table = over_the_wire("process", arr)
    a, b = (json.loads(ln) for ln in jsonlines.lines("process", arr, table, SENSOR))
    assert (a["kind"], b["kind"]) == ("EXEC", "9")
    assert a["exec_command_line"] == "/bin/caf\u00e9 \u00ff" and b["exec_command_line"] == "\ufffd"
    assert a["sensor_monotime_nanos"] == 2**64 - 1 and a["uid"] == -1
    assert a["id"] == a["event_id"] == ref_event_id(SENSOR, 7, 2**64 - 1)
    assert (a["container_id"], a["image_name"], b["container_id"]) == ("c1" * 32, "busybox:latest", "")
    assert (a["k8s_namespace"], a["k8s_labels"], b["k8s_pod_name"], b["k8s_labels"]) == ("", {}, "", {})


def test_kubernetes_identity_by_hand():
    arr = schema.empty("file", 3)
    arr["sensor_sequence_number"] = [1, 2, 3]
    arr["container"] = [2, 0, 2]
    _, arr, table = over_the_wire("file", arr)
    for events in (to_dicts("file", arr, table, SENSOR),
                   [json.loads(ln) for ln in jsonlines.lines("file", arr, table, SENSOR)]):
        a, host, c = events
        assert all(a[k] == c[k] for k in jsonlines.K8S_KEYS)
        assert (a["k8s_namespace"], a["k8s_pod_name"], a["k8s_pod_uid"], a["k8s_container_name"]) == (
            "prod", "web-7d4b9", "0d2c6f6a-1b2c-4d5e-8f90-123456789abc", "nginx")
        assert a["k8s_labels"] == {"app": "web", "tier": "front\"end"}
        assert list(a).index("k8s_namespace") == list(a).index("image_name") + 1
        assert (host["k8s_namespace"], host["k8s_pod_uid"], host["k8s_labels"]) == ("", "", {})


def test_empty_batches():
    for category, extra in CASES:
        _, arr, table = over_the_wire(category, batch(category, 0, 0, extra))
        assert to_dicts(category, arr, table, SENSOR) == [] and jsonlines.lines(category, arr, table, SENSOR) == []


def window(*parts):
    out = []
    for category, seqs in parts:
        arr = schema.empty(category, len(seqs))
        arr["sensor_sequence_number"] = seqs
        arr["kind"] = 1
        out.append((category, arr, {}))
    return out


def test_window_lines_in_sequence_order_across_categories():
    w = window(("lost", [0]), ("process", [11, 14, 15]), ("file", [12, 13, 17]), ("container", [10, 16]))
    lines = [json.loads(ln) for ln in jsonlines.window_lines(w, SENSOR).splitlines()]
    assert [e["sensor_sequence_number"] for e in lines] == [0, 10, 11, 12, 13, 14, 15, 16, 17]
    assert [e["type"] for e in lines] == ["lost", "container", "process", "file", "file", "process",
                                          "process", "container", "file"]
    assert [e["sensor_sequence_number"] for e in jsonlines.window_dicts(w, SENSOR)] == [0, *range(10, 18)]
    # a lost notice without a number (0) keeps its place ahead: the sort is stable
    w = window(("lost", [0]), ("process", [3]), ("lost", [0]))
    assert [e["type"] for e in jsonlines.window_dicts(w)] == ["lost", "lost", "process"]


def test_window_already_in_order_is_left_alone():
    w = window(("process", [1, 2]), ("file", [3]))
    assert jsonlines.sequence_order(w) is None
    assert [e["sensor_sequence_number"] for e in jsonlines.window_dicts(w)] == [1, 2, 3]
