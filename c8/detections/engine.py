"""The rule engine: whole batches in, alerts out.

Each enabled rule is compiled once per category it needs into a numpy mask
function (the filter language's ``compile_mask``) of ``kind in (...) and
(condition)``. A batch is evaluated rule by rule on whole arrays; Python
objects are made only for the rows that match.

The engine also keeps a bounded cache process_id -> (exec filename, command
line) from the EXEC events it sees, so alerts on file or network events name
the program; ``flush()`` empties it (the event limiter's TRIPPED).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable

import numpy as np

from c8 import schema
from c8.detections.alerts import Alert, event_name, render, wall_time_iso
from c8.detections.rules import Rule

EXEC_CODE = schema.kind_code("process", "EXEC")
# columns the broker's process table adds (process, file, network events; used when present)
PROCESS_COLUMNS = ("process_exec_filename", "process_command_line")


def _kind_clause(category: str, kinds: tuple[str, ...] | None) -> str | None:
    if kinds is None or set(kinds) == set(schema.KINDS[category]):
        return None
    return "kind in (" + ", ".join(f'"{k}"' for k in kinds) + ")"


def rule_filter(rule: Rule, category: str) -> str:
    """The filter text of one rule on one category (kinds and condition)."""
    kinds = _kind_clause(category, rule.events[category])
    return f"{kinds} and ({rule.expanded})" if kinds else f"({rule.expanded})"


class Engine:
    """Evaluates the enabled rules on batches (see the module docstring)."""

    def __init__(self, rules: Iterable[Rule], track_execs: bool = True, cache_size: int = 8192,
                 sensor_id: str = ""):
        from c8.expr import compile_mask, parse

        self.loaded = list(rules)   # disabled ones included (c8ctl rules list)
        self.rules = [r for r in self.loaded if r.enabled and r.node is not None]
        self.track_execs = track_execs
        self.cache_size = cache_size
        self.sensor_id = sensor_id
        self.processes: OrderedDict[bytes, tuple[str, str]] = OrderedDict()
        self.matches: dict[str, int] = {r.name: 0 for r in self.rules}
        self._compiled: dict[str, list[tuple[Rule, object]]] = {}
        for rule in self.rules:
            for category in rule.events:
                node = parse(rule_filter(rule, category))
                self._compiled.setdefault(category, []).append((rule, compile_mask(node, category)))

    def subscription_spec(self) -> dict:
        """The union of what the rules need: ``{"events": {category: {"filter": ...}}}``.

        Each category's filter is the OR of its rules' filters; process EXEC
        events are added when execs are tracked. (``limiter`` and ``lost``
        events reach every subscriber without asking.)
        """
        events: dict[str, dict] = {}
        for category, compiled in self._compiled.items():
            parts = [rule_filter(rule, category) for rule, _ in compiled]
            if category == "process" and self.track_execs:
                parts.append('kind == "EXEC"')
            events[category] = {"filter": " or ".join(dict.fromkeys(parts))}
        if self.track_execs and "process" not in events:
            events["process"] = {"filter": 'kind == "EXEC"'}
        return {"events": events}

    def flush(self) -> None:
        """Forget cached process identities."""
        self.processes.clear()

    def evaluate(self, category: str, batch: np.ndarray, containers: dict | None) -> list[Alert]:
        """Alerts of every rule matching events of this batch, in rule order."""
        containers = containers if containers is not None else {}
        if category == "process" and self.track_execs and len(batch):
            self._learn_execs(batch)
        alerts: list[Alert] = []
        for rule, mask_fn in self._compiled.get(category, ()):
            idx = np.flatnonzero(mask_fn(batch, containers))
            if len(idx):
                self.matches[rule.name] += len(idx)
                alerts += self._alerts(rule, category, batch[idx], containers)
        return alerts

    def _learn_execs(self, batch: np.ndarray) -> None:
        execs = batch[batch["kind"] == EXEC_CODE]
        for pid_id, fn, cmd in zip(execs["process_id"].tolist(), execs["exec_filename"].tolist(),
                                   execs["exec_command_line"].tolist(), strict=True):
            self.processes[pid_id] = (fn.decode(errors="replace"), cmd.decode(errors="replace"))
            self.processes.move_to_end(pid_id)
        while len(self.processes) > self.cache_size:
            self.processes.popitem(last=False)

    def _alerts(self, rule: Rule, category: str, rows: np.ndarray, containers: dict) -> list[Alert]:
        from c8.clients.client import to_dicts

        out = []
        raw_ids = rows["process_id"].tolist()
        for raw_id, ev in zip(raw_ids, to_dicts(category, rows, containers, self.sensor_id), strict=True):
            process = self._process(ev, raw_id)
            container = {k: ev.get(k, "") for k in ("container_id", "container_name", "image_id", "image_name")}
            values = {**ev, "rule": rule.name, "priority": rule.priority,
                      "process_exec_filename": process.get("exec_filename"),
                      "process_command_line": process.get("command_line")}
            mono = int(ev.get("sensor_monotime_nanos", 0))
            time_iso = wall_time_iso(mono)
            values["time"] = time_iso
            name = event_name(ev)
            out.append(Alert(rule=rule.name, priority=rule.priority, output=render(rule.output, values),
                             time_nanos=mono, time=time_iso, event=ev, process=process,
                             container=container, tags=list(rule.tags), first_name=name,
                             last_name=name, last_time_nanos=mono, last_time=time_iso))
        return out

    def _process(self, ev: dict, raw_id: bytes) -> dict:
        proc = {"pid": ev.get("process_pid"), "tid": ev.get("process_tid"),
                "process_id": ev.get("process_id"), "exec_filename": None, "command_line": None}
        if ev.get("type") == "process" and ev.get("kind") == "EXEC":
            proc["exec_filename"] = ev.get("exec_filename") or None
            proc["command_line"] = ev.get("exec_command_line") or None
        elif ev.get("process_exec_filename"):
            proc["exec_filename"] = ev["process_exec_filename"]
            proc["command_line"] = ev.get("process_command_line") or None
        elif raw_id in self.processes:
            proc["exec_filename"], cmd = self.processes[raw_id]
            proc["command_line"] = cmd or None
        return proc
