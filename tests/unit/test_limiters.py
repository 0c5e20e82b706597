"""The event limiter's state machine and the per-output alert limiter, on a fake clock."""

from __future__ import annotations

import numpy as np
import pytest

from c8 import schema
from c8.broker.limiter import (
    ACTIVE,
    DORMANT,
    EXITED,
    EXITING,
    KEEP,
    RESUMED,
    TRIPPED,
    EventLimiter,
    format_top,
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


# ---- event limiter: who tripped it ------------------------------------------------

def batch(category: str, pid: int, uid: int, container: int, n: int) -> np.ndarray:
    b = schema.empty(category, n)
    b["process_pid"], b["uid"], b["container"] = pid, uid, container
    return b


def test_trip_names_the_top_pids_uids_and_containers():
    clock = FakeClock()
    lim = make(clock, duration=3.0)
    for _ in range(3):
        # the flooder: pid 4242 (uid 1000, container 7); background: pids 1..40 (root, host)
        noise = [batch("syscall", p, 0, 0, 2) for p in range(1, 41)]
        lim.count_batches([batch("file", 4242, 1000, 7, 300), batch("process", 777, 1000, 7, 30),
                           *noise, batch("lost", 0, 0, 0, 0)])
        clock.advance(1.0)
    [trip] = [t for t in iter(lim.poll, None)]
    assert trip.kind == TRIPPED
    assert trip.top_pids[:2] == ((4242, 900), (777, 90))
    assert len(trip.top_pids) == 5 and all(c == 6 for _, c in trip.top_pids[2:])
    assert trip.top_uids == ((1000, 990), (0, 240))
    assert trip.top_containers == ((7, 990), (0, 240))
    assert format_top(trip.top_pids[:2]) == "4242:900,777:90"
    assert format_top(trip.top_containers, lambda i: "host" if i == 0 else f"c{i}") == "c7:990,host:240"


def test_only_the_windows_of_the_streak_count():
    clock = FakeClock()
    lim = make(clock, duration=2.0)
    lim.count_batches([batch("file", 1, 0, 0, 500)])    # over, then broken by a quiet window
    clock.advance(1.0)
    lim.count_batches([batch("file", 1, 0, 0, 10)])
    clock.advance(1.0)
    for _ in range(2):                                   # the streak that trips: pid 2 only
        lim.count_batches([batch("file", 2, 5, 0, 150)])
        clock.advance(1.0)
    [trip] = list(iter(lim.poll, None))
    assert trip.top_pids == ((2, 300),) and trip.top_uids == ((5, 300),)


def test_events_while_dormant_are_not_tallied_and_exiting_names_culprits():
    clock = FakeClock()
    lim = make(clock, duration=1.0, retries=1)
    lim.count_batches([batch("file", 1, 0, 0, 200)])
    clock.advance(1.0)
    assert lim.poll().top_pids == ((1, 200),)
    lim.count_batches([batch("file", 9, 0, 0, 10_000)])  # dormant: ignored
    assert lim.ignored == 10_000
    clock.advance(1.0)
    assert lim.poll().kind == RESUMED
    lim.count_batches([batch("file", 3, 0, 0, 200)])
    clock.advance(1.0)
    last = lim.poll()
    assert last.kind == EXITING and last.top_pids == ((3, 200),)


def test_pid_churn_keeps_the_tally_bounded_and_the_top_exact():
    clock = FakeClock()
    lim = make(clock, eps=1000, duration=1.0)
    churn = schema.empty("process", 50_000)
    churn["process_pid"] = np.arange(100_000, 150_000)  # a fork storm: every pid new
    lim.count_batches([churn, batch("file", 31337, 0, 0, 5000)])
    assert len(lim._tally["process_pid"][0]) <= 4 * KEEP
    clock.advance(1.0)
    trip = lim.poll()
    assert trip.top_pids[0] == (31337, 5000)


# ---- alert limiter ---------------------------------------------------------------

class Recorder(Output):
    """An output that keeps what it is given (the test's observable)."""

    type = "recorder"

    def __init__(self, name="recorder"):
        super().__init__(name)
        self.alerts, self.notices, self.details = [], [], []

    def send(self, alert):
        self.alerts.append(alert)

    def notice(self, text, details=None):
        self.notices.append(text)
        self.details.append(details)


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
    assert rec.notices == ['15 alerts suppressed by stdout in the last 60s: "?" 15']
    assert '15 alerts suppressed by stdout in the last 60s: "?" 15' in caplog.text
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
    assert rec.notices == ['2 alerts suppressed by recorder in the last 10s: "?" 2']
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


def test_summary_names_the_suppressed_rules_with_counts():
    """A flood of one rule meant to hide another: the summary shows both."""
    from c8.detections.alerts import Alert

    clock = FakeClock()
    rec = Recorder("webhook")
    lim = AlertLimiter(rec, limit_per_period=2, limit_period=60, clock=clock)
    for _ in range(50):
        lim.send({"rule": "Noise"})
    lim.send(Alert(rule="Read sensitive file", priority="warning", output="x", time_nanos=0,
                   time="", event={}, process={}, container={}))
    lim.send({"rule": 'Odd "name"\nsecond line'})
    clock.advance(60)
    lim.tick()
    assert rec.notices == ['50 alerts suppressed by webhook in the last 60s: "Noise" 48, '
                           '"Odd \\"name\\"\\nsecond line" 1, "Read sensitive file" 1']
    assert rec.details == [{"suppressed": 50, "rules": {"Noise": 48, 'Odd "name"\nsecond line': 1,
                                                        "Read sensitive file": 1}}]
    assert lim.stats()["suppressed"] == 50 and lim.stats()["alerts"] == 2


def test_summary_names_at_most_ten_rules_and_bounds_the_tally(monkeypatch):
    import c8.detections.limiter as mod

    monkeypatch.setattr(mod, "MAX_RULES", 20)
    clock = FakeClock()
    rec = Recorder()
    lim = AlertLimiter(rec, limit_per_period=0, limit_period=10, clock=clock)
    for i in range(30):
        lim.send({"rule": f"r{i:02d}"})
    clock.advance(10)
    lim.tick()
    [text] = rec.notices
    assert text.endswith('"other" 10, "r00" 1, "r01" 1, "r02" 1, "r03" 1, "r04" 1, "r05" 1, '
                         '"r06" 1, "r07" 1, "r08" 1 and 11 more rules')


@pytest.mark.parametrize("text,seconds", [("60s", 60), ("2m", 120), ("500ms", 0.5),
                                          ("1h", 3600), (30, 30), ("1m30s", 90)])
def test_parse_duration(text, seconds):
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("bad", ["", "10x", "-5s", "s", None, True])
def test_parse_duration_rejects(bad):
    with pytest.raises(ValueError):
        parse_duration(bad)
