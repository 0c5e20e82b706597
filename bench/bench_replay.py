"""c8ctl replay: events per second through the default rules, from a Parquet capture.

1. A private sensor records a workload (a paced open() loop, plus whatever the
   host execs meanwhile) with ``c8.clients.capture.record``: process and file
   events to Parquet. Anchor: the rate the sensor delivered events while it
   recorded (a replay must outrun live delivery to be of use on long captures).
2. The capture through ``capture.replay`` and the packaged default rules
   (c8.detections.engine.Engine, masks on whole columns), best of three.
3. Anchor 2: the same rules evaluated the per-event way (one dict per event,
   c8.expr.evaluate per rule), on the first events of the same capture; the
   matches of both paths on those events are printed (they must agree).

Usage: python bench/bench_replay.py [--quick]
"""

from __future__ import annotations

import os
import tempfile
import time

import common as c

from c8.clients import capture, jsonlines
from c8.clients.client import Client
from c8.detections.engine import Engine, rule_filter
from c8.detections.rules import default_rules_path, load_rules
from c8.expr import parse
from c8.expr.evaluate import evaluate

OPEN_RATE = 20000      # open()+close() per second by the workload
PER_EVENT_SAMPLE = 20000  # events evaluated the per-event way


def default_engine() -> Engine:
    rules, errors = load_rules([default_rules_path()])
    if errors:
        raise RuntimeError(f"default rules do not load: {errors}")
    return Engine(rules)


def record_workload(path: str, seconds: float) -> dict:
    """A paced open loop recorded to ``path``; the recorder's stats."""
    with c.BenchSensor() as sensor:
        with Client(sensor.run_dir, timeout=10.0).subscribe(
                {"events": {"process": {}, "file": {}}}, queue=1024) as sub:
            marker = os.path.join(os.path.dirname(path), "replay-marker")
            with open(marker, "w") as f:
                f.write("x")
            w = c.Workload("paced", OPEN_RATE, seconds, marker, cpu=c.STORM_CPU)
            w.go()
            stats = capture.record(sub, path, duration=seconds + 0.5)
            w.wait()
    return stats


def replay_rate(path: str, repeat: int = 3) -> tuple[float, int, int]:
    """(best events/s, events, alerts) of replaying ``path`` through the default rules."""
    best, events, alerts = 0.0, 0, 0
    for _ in range(repeat):
        engine = default_engine()
        t0 = time.perf_counter()
        events = alerts = 0
        for _category, arr, found in capture.replay(path, engine):
            events += len(arr)
            alerts += len(found)
        best = max(best, events / (time.perf_counter() - t0))
    return best, events, alerts


def per_event_rate(path: str, limit: int = PER_EVENT_SAMPLE) -> tuple[float, int, int, int]:
    """(events/s, events, matches, the engine's matches on the same events) for the
    rules evaluated one event dict at a time."""
    engine = default_engine()
    compiled: dict[str, list] = {}
    for rule in engine.rules:
        for category in rule.events:
            compiled.setdefault(category, []).append(parse(rule_filter(rule, category)))
    batches = []
    n = 0
    for category, arr, tables in capture.read_batches(path):
        if n >= limit:
            break
        arr = arr[: limit - n]
        batches.append((category, arr, tables))
        n += len(arr)
    t0 = time.perf_counter()
    matches = 0
    for category, arr, tables in batches:
        nodes = compiled.get(category, ())
        for ev in jsonlines.dicts(category, arr, tables):
            for node in nodes:
                matches += evaluate(node, ev)
    seconds = time.perf_counter() - t0
    for category, arr, tables in batches:
        if category in ("lost", "limiter"):
            continue
        engine.evaluate(category, arr, tables)
    engine_matches = sum(engine.matches.values())
    return (n / seconds if seconds else 0.0), n, matches, engine_matches


def run(quick: bool) -> dict:
    seconds = 3.0 if quick else 8.0
    with tempfile.TemporaryDirectory(prefix="c8bench-replay-") as tmp:
        path = os.path.join(tmp, "capture.parquet")
        stats = record_workload(path, seconds)
        delivered = stats["events"] / stats["seconds"] if stats["seconds"] else 0.0
        rate, events, alerts = replay_rate(path)
        slow, sample, slow_matches, fast_matches = per_event_rate(path)
        size = os.path.getsize(path)
    rows = [
        ("replay events/s through the default rules (c8) / sensor delivery rate while recording",
         rate, delivered, round(rate / delivered, 1) if delivered else None, "> 1"),
        ("replay events/s: column-wise engine / per-event evaluation of the same rules",
         rate, slow, round(rate / slow, 1) if slow else None, "-"),
    ]
    notes = [f"capture: {events:,} events ({stats['rows']:,} rows, {stats['row_groups']} row groups) "
             f"recorded in {stats['seconds']:.1f} s, {size / max(events, 1):.0f} bytes per event on disk "
             f"(zstd), lost while recording: {stats['lost'] or 'none'}",
             f"{alerts:,} alerts from the default rules; on the first {sample:,} events the per-event "
             f"path matched {slow_matches:,} times, the engine {fast_matches:,}"]
    return {"title": "Replay: a Parquet capture through the default rules", "rows": rows, "notes": notes}

if __name__ == "__main__":
    c.standalone(run)
