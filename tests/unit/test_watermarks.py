"""The merge's cut point from collector ticks that may overtake their batches
(c8.broker.watermarks); the collector side is tested against a real broker in
tests/integration/test_supervised_sensor.py (a paused broker)."""

import time

import pytest

from c8.broker.watermarks import MAX_WAIT_NS, SLACK_NS, Watermarks

NOW = 10_000_000_000


def tick(cpu, wm, seq, pid=100):
    return {"kind": "tick", "cpu": cpu, "pid": pid, "seq": seq, "watermark": wm}


def msg(cpu, seq, pid=100):
    return {"kind": "samples", "cpu": cpu, "pid": pid, "seq": seq}


def test_a_tick_waits_for_the_batches_it_covers():
    w = Watermarks()
    w.on_tick(tick(0, NOW - 5_000_000, 0))  # nothing sent before it: counts at once
    assert w.reached(NOW) == NOW - 5_000_000 - SLACK_NS and w.moved
    w.moved = False
    w.on_message(msg(0, 1))
    w.on_tick(tick(0, NOW - 3_000_000, 3))  # overtook messages 2 and 3
    assert w.reached(NOW) == NOW - 5_000_000 - SLACK_NS and not w.moved
    w.on_message(msg(0, 2))
    assert w.reached(NOW) == NOW - 5_000_000 - SLACK_NS
    w.on_message(msg(0, 3))
    assert w.reached(NOW) == NOW - 3_000_000 - SLACK_NS and w.moved


def test_the_newest_held_tick_counts_and_the_slowest_cpu_cuts():
    w = Watermarks()
    w.on_tick(tick(0, NOW - 9_000_000, 0))
    w.on_tick(tick(1, NOW - 8_000_000, 0))
    w.on_tick(tick(1, NOW - 7_000_000, 4))
    w.on_tick(tick(1, NOW - 6_000_000, 5))  # replaces the one held
    w.on_message(msg(1, 5))
    w.on_tick(tick(0, NOW - 2_000_000, 0))
    assert w.reached(NOW) == NOW - 6_000_000 - SLACK_NS


def test_another_collector_process_does_not_cover_a_tick():
    """A restarted collector numbers from 1 again: the old one's messages say nothing
    of what the new one sent."""
    w = Watermarks()
    w.on_message(msg(0, 50, pid=100))
    w.on_tick(tick(0, NOW - 1_000_000, 2, pid=200))
    assert w.reached(NOW) == NOW  # no mark yet: nothing holds the merge
    w.on_tick(tick(1, NOW - 4_000_000, 0))
    assert w.reached(NOW) == NOW - 4_000_000 - SLACK_NS
    w.on_message(msg(0, 2, pid=200))
    assert w.reached(NOW) == NOW - 4_000_000 - SLACK_NS  # cpu0's mark is the later one
    assert w.marks[0][0] == NOW - 1_000_000


def test_a_stalled_collector_holds_the_merge_at_most_max_wait(monkeypatch):
    w = Watermarks()
    w.on_tick(tick(0, NOW - 5 * MAX_WAIT_NS, 0))
    assert w.reached(NOW) == NOW - MAX_WAIT_NS
    later = time.monotonic() + 3  # and one silent for 2 s stops counting
    monkeypatch.setattr(time, "monotonic", lambda: later)
    assert w.reached(NOW) == NOW


@pytest.mark.parametrize("bad", [{}, {"cpu": "0", "watermark": 1}, {"cpu": 0, "watermark": None}])
def test_a_malformed_tick_is_refused_by_name(bad):
    with pytest.raises(ValueError, match="tick without cpu and watermark"):
        Watermarks().on_tick(bad)


def test_messages_without_numbers_change_nothing():
    w = Watermarks()
    w.on_message({"kind": "stats"})
    w.on_message({"kind": "samples", "cpu": 0, "seq": "x"})
    assert w.reached(NOW) == NOW and not w.moved
