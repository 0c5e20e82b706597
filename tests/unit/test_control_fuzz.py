"""Fuzzing the control protocol: any bytes a client sends get an error reply
(or are dropped), never an exception in the broker.

The broker is the real ``Broker`` with its sockets replaced by recorders (no
zmq I/O is needed to drive ``_handle``); parse_request is fuzzed on its own.
"""

from __future__ import annotations

import msgpack
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from c8.protocol import control, errors
from tests.unit.conftest import RecordingSocket

FUZZ = settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                        HealthCheck.function_scoped_fixture])


scalars = st.one_of(st.none(), st.booleans(), st.integers(-(2**63), 2**64 - 1), st.floats(allow_nan=True),
                    st.text(max_size=20), st.binary(max_size=20))
values = st.recursive(scalars, lambda kids: st.one_of(st.lists(kids, max_size=4),
                                                       st.dictionaries(st.text(max_size=8), kids, max_size=4)),
                      max_leaves=12)
FIELDS = ["exec_command_line", "filename", "id", "kind", "ret", "process_pid", "image_name", "nope"]
filters = st.one_of(
    st.text(max_size=40),
    st.builds(lambda f, op, v: f"{f} {op} {v}", st.sampled_from(FIELDS),
              st.sampled_from(["==", "!=", "<", "like", "in", "is"]),
              st.sampled_from(['"a*"', "3", "(1, 2)", "null", '"x"', "", "((", "-1e9"])),
    values,
)
categories = st.sampled_from(["process", "file", "syscall", "network", "container", "kernel_call", "user_call",
                              "bogus", 7])
specs = st.one_of(
    values,
    st.fixed_dictionaries({"events": st.dictionaries(categories, st.one_of(
        values, st.fixed_dictionaries({}, optional={"filter": filters, "kinds": values})), max_size=3)},
        optional={"modifiers": st.one_of(values, st.fixed_dictionaries({}, optional={"rate": scalars,
                                                                                       "limit": scalars})),
                  "containers": values}),
)
requests = st.one_of(
    st.binary(max_size=200),
    values.map(lambda v: msgpack.packb(v, use_bin_type=True)),
    st.builds(lambda c, p, i: msgpack.packb({"id": i, "command": c, "properties": p}, use_bin_type=True),
              st.sampled_from([*control.COMMANDS, "nope", ""]), st.one_of(specs, values), values),
)


@FUZZ
@given(requests)
def test_parse_request_raises_only_protocol_errors(raw):
    try:
        req = control.parse_request(raw)
    except errors.ProtocolError as exc:
        assert exc.code in errors.NAMES
        return
    assert req["command"] in control.COMMANDS and isinstance(req["properties"], dict)


@FUZZ
@given(st.lists(requests, min_size=1, max_size=3), st.booleans())
def test_handle_replies_or_drops_never_raises(broker, raws, req_envelope):
    for raw in raws:
        before = len(broker.control.sent)
        pending = len(broker.pending_replies)
        frames = [b"u\x00peer", b"", raw] if req_envelope else [b"u\x00peer", raw]
        broker._handle(frames)
        if len(broker.pending_replies) > pending:
            # an accepted subscription: its reply waits for the collectors' plan
            envelope, reply, _, _ = broker.pending_replies[-1]
            assert control.parse_reply(reply)["status"] == "ok"
            continue
        assert len(broker.control.sent) == before + 1
        sent = broker.control.sent[-1]
        # the reply goes to the peer's routing id (tag stripped), through a REQ envelope if there was one
        assert sent[0] == b"\x00peer"
        assert sent[1:-1] == ([b""] if req_envelope else [])
        reply = control.parse_reply(sent[-1])
        assert reply["status"] in ("ok", "error")
        if reply["status"] == "error":
            assert reply["code"] != errors.INTERNAL, reply


@FUZZ
@given(st.lists(st.binary(max_size=30), min_size=2, max_size=4))
def test_multi_frame_requests_are_refused(broker, frames):
    broker._handle([b"u\x00peer", *frames])
    if broker.control.sent:
        reply = control.parse_reply(broker.control.sent[-1][-1])
        assert reply["status"] == "error" or (frames[0] == b"" and len(frames) == 2)


def test_huge_request_gets_an_error(broker):
    broker._handle([b"u\x00peer", b"\x00" * (control.MAX_REQUEST_BYTES + 1)])
    reply = control.parse_reply(broker.control.sent[-1][-1])
    assert reply["code"] == errors.BAD_MESSAGE and "exceeds" in reply["reason"]


def test_a_reply_that_cannot_be_sent_is_dropped(broker):
    class Broken(RecordingSocket):
        def send_multipart(self, frames, flags=0):
            raise RuntimeError("socket gone")

    broker.control = broker.listeners[b"u"] = Broken()
    broker._handle([b"u\x00peer", control.request("status")])  # no exception
