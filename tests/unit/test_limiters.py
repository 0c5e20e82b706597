"""The event limiter's state machine and the per-output alert limiter, on a fake clock."""

from __future__ import annotations

import pytest

from c8.broker.limiter import (
    ACTIVE,
    DORMANT,
    EXITED,
    EXITING,
    RESUMED,
    TRIPPED,
    EventLimiter,
)
from c8.detections.limiter import AlertLimiter, parse_duration
from c8.detections.outputs.base import Output


class FakeClock:
    def __init__(self, t: float = 1000.0):
        self.t = t

    def __call__(self) -> float:
        return self.t

    def advance(self, dt: float) -> None:
        self.t += dt


def run_rate(lim: EventLimiter, clock: FakeClock, per_window: int, windows: int) -> list:
    """Feed per_window events in each of `windows` windows; collect transitions."""
    out = []
    for _ in range(windows):
        lim.count(per_window)
        clock.advance(lim.window_s)
        while (t := lim.poll()) is not None:
            out.append(t)
    return out


def make(clock, eps=100, duration=5.0, retries=2, window=1.0):
    return EventLimiter(eps, duration, retries, window, clock=clock)


# ---- event limiter ---------------------------------------------------------------

def test_trips_after_duration_of_over_windows():
    clock = FakeClock()
    lim = make(clock)
    assert run_rate(lim, clock, 101, 4) == []          # 4 s over: not yet
    trans = run_rate(lim, clock, 101, 1)               # 5th over window
    assert [t.kind for t in trans] == [TRIPPED]
    assert trans[0].dormancy_s == 5.0 and trans[0].trips == 1
    assert trans[0].dormancy_nanos == 5_000_000_000
    assert lim.state == DORMANT


def test_exactly_the_rate_is_not_over():
    clock = FakeClock()
    lim = make(clock)
    assert run_rate(lim, clock, 100, 20) == []
    assert lim.state == ACTIVE


def test_one_window_below_breaks_the_streak():
    clock = FakeClock()
    lim = make(clock)
    assert run_rate(lim, clock, 500, 4) == []
    assert run_rate(lim, clock, 50, 1) == []           # the dip
    assert run_rate(lim, clock, 500, 4) == []          # streak restarted: 4 < 5
    assert lim.state == ACTIVE
    assert [t.kind for t in run_rate(lim, clock, 500, 1)] == [TRIPPED]


def test_a_window_with_no_events_breaks_the_streak():
    clock = FakeClock()
    lim = make(clock)
    run_rate(lim, clock, 500, 3)
    clock.advance(2.0)                                 # two silent windows
    assert lim.poll() is None
    assert run_rate(lim, clock, 500, 4) == []
    assert lim.state == ACTIVE


def test_dormancy_ignores_events_then_resumes_by_itself():
    clock = FakeClock()
    lim = make(clock)
    [trip] = run_rate(lim, clock, 500, 5)
    # while dormant, a flood of events counts for nothing
    assert run_rate(lim, clock, 10_000, 4) == []
    assert lim.ignored == 40_000
    clock.advance(0.999)
    assert lim.poll() is None
    clock.advance(0.001)
    resumed = lim.poll()
    assert resumed.kind == RESUMED and resumed.at == trip.at + 5.0
    assert lim.state == ACTIVE


def test_dormancy_doubles_then_exits_after_max_retries():
    clock = FakeClock()
    lim = make(clock, retries=3)
    dormancies = []
    for _ in range(3):
        [trip] = run_rate(lim, clock, 500, 5)
        assert trip.kind == TRIPPED
        dormancies.append(trip.dormancy_s)
        clock.advance(trip.dormancy_s)
        assert lim.poll().kind == RESUMED
    assert dormancies == [5.0, 10.0, 20.0]
    [last] = run_rate(lim, clock, 500, 5)
    assert last.kind == EXITING and last.trips == 4
    assert lim.state == EXITED
    clock.advance(1000)
    lim.count(10)
    assert lim.poll() is None


def test_zero_retries_exits_on_first_trip():
    clock = FakeClock()
    lim = make(clock, retries=0)
    assert [t.kind for t in run_rate(lim, clock, 500, 5)] == [EXITING]


def test_windows_group_counts():
    # 10 s windows: 1500 events per 10 s window is 150/s, over 100/s
    clock = FakeClock()
    lim = make(clock, duration=30, window=10)
    assert run_rate(lim, clock, 1500, 2) == []
    assert [t.kind for t in run_rate(lim, clock, 1500, 1)] == [TRIPPED]


def test_late_poll_sees_trip_and_resume_in_order():
    clock = FakeClock()
    lim = make(clock)
    for _ in range(5):
        lim.count(500)
        clock.advance(1.0)
    clock.advance(100)       # the broker did not poll for a long time
    kinds = [lim.poll().kind, lim.poll().kind]
    assert kinds == [TRIPPED, RESUMED]
    assert lim.poll() is None


@pytest.mark.parametrize("args", [(0, 1, 1, 1), (1, 0, 1, 1), (1, 1, -1, 1), (1, 1, 1, 0)])
def test_bad_parameters_are_refused(args):
    with pytest.raises(ValueError):
        EventLimiter(*args)


# ---- alert limiter ---------------------------------------------------------------

class Recorder(Output):
    """An output that keeps what it is given (the test's observable)."""

    type = "recorder"

    def __init__(self, name="recorder"):
        super().__init__(name)
        self.alerts, self.notices = [], []

    def send(self, alert):
        self.alerts.append(alert)

    def notice(self, text):
        self.notices.append(text)


def test_limit_5_per_60s_delivers_5_and_one_summary(caplog):
    clock = FakeClock()
    rec = Recorder("stdout")
    lim = AlertLimiter(rec, limit_per_period=5, limit_period=60, clock=clock)
    for i in range(20):
        lim.send({"n": i})
        clock.advance(1)
    assert [a["n"] for a in rec.alerts] == [0, 1, 2, 3, 4]
    assert rec.notices == []           # the period has not rolled over yet
    clock.advance(40)
    lim.tick()
    assert rec.notices == ["15 alerts suppressed by stdout in the last 60s"]
    assert "15 alerts suppressed by stdout in the last 60s" in caplog.text
    lim.tick()
    assert len(rec.notices) == 1       # one line per period
    assert lim.suppressed_total == 15
    # the next period delivers again
    lim.send({"n": 99})
    assert rec.alerts[-1] == {"n": 99}


def test_summary_comes_with_next_alert_after_rollover():
    clock = FakeClock()
    rec = Recorder()
    lim = AlertLimiter(rec, limit_per_period=1, limit_period=10, clock=clock)
    for _ in range(3):
        lim.send({})
    clock.advance(25)                  # two periods later, without a tick
    lim.send({"late": True})
    assert rec.notices == ["2 alerts suppressed by recorder in the last 10s"]
    assert rec.alerts[-1] == {"late": True}


def test_unlimited_output_gets_everything():
    clock = FakeClock()
    rec = Recorder()
    lim = AlertLimiter(rec, clock=clock)
    for i in range(20):
        lim.send({"n": i})
    clock.advance(3600)
    lim.tick()
    assert len(rec.alerts) == 20 and rec.notices == []


def test_limit_without_period_is_refused():
    with pytest.raises(ValueError, match="limit_period"):
        AlertLimiter(Recorder(), limit_per_period=5)


@pytest.mark.parametrize("text,seconds", [("60s", 60), ("2m", 120), ("500ms", 0.5),
                                          ("1h", 3600), (30, 30), ("1m30s", 90)])
def test_parse_duration(text, seconds):
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("bad", ["", "10x", "-5s", "s", None, True])
def test_parse_duration_rejects(bad):
    with pytest.raises(ValueError):
        parse_duration(bad)
