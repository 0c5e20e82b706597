"""The probe plan: what the collectors must collect for the live subscriptions.

Sources are the union of what subscriptions need (reference counting is
recomputing that union on every change: with no subscription the plan is
empty and every perf event is closed). Filters are pushed down as the OR of
the subscriptions' filters that the kernel can express; the broker still
evaluates every full expression, so pushdown only removes unwanted events.
The plan is :func:`compute_plan`, a pure function of the subscriptions, the
failures the collectors reported, the sensor's own threads and the config;
:class:`Planner` keeps the generation, those failures and the probe builders.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import msgpack
import numpy as np

from c8 import expr, schema
from c8.broker import catalog
from c8.host import proc as hostproc
from c8.protocol import errors

log = logging.getLogger("c8.broker.plan")


class Planner:
    """The current plan, its generation and what the collectors said failed.

    ``send`` publishes a packed plan to the collectors (the broker's PUB socket).
    """

    def __init__(self, config: dict, send: Callable[[bytes], None]):
        self.pushdown = bool(config["pushdown"])  # false: the broker filters alone
        self.send = send
        self.generation = 0
        self.plan: dict = {"generation": 0, "enabled": False, "tracepoints": {}, "probes": {}, "bpf": {},
                           "bpf_owner": None}
        self.failed_bpf: dict[str, str] = {}      # family -> error, from collector cpu0's stats
        self.filter_errors: dict[str, str] = {}   # source -> kernel's refusal
        self.probe_sources: dict[str, catalog.Source] = {}
        self.probe_errors: dict[str, str] = {}
        self.subscriptions: list = []             # as of the last update (probe builders read them)

    # -- computing the plan -----------------------------------------------------------------
    def update(self, subscriptions, own_pids, bpf_owner: int | None, dormant: bool) -> bool:
        """Recompute the plan (compute_plan of these inputs and the failures noted);
        publish it when it changed. True when it did."""
        subs = self.subscriptions = list(subscriptions)
        plan = compute_plan(subs, failed_bpf=self.failed_bpf, filter_errors=self.filter_errors,
                            own_pids=own_pids, own_tids=own_threads(own_pids), bpf_owner=bpf_owner,
                            pushdown=self.pushdown, dormant=dormant)
        if {k: v for k, v in self.plan.items() if k != "generation"} == plan:
            return False
        self.generation += 1
        self.plan = dict(plan, generation=self.generation)
        log.info("plan %d: %s", self.generation, sorted(plan["tracepoints"]) + ["bpf:" + f for f in plan["bpf"]])
        self.publish()
        return True

    def publish(self) -> None:
        self.send(msgpack.packb(self.plan))

    def clear(self) -> None:
        self.generation += 1
        self.plan = {"generation": self.generation, "enabled": False, "tracepoints": {}, "probes": {}, "bpf": {},
                     "bpf_owner": None}
        self.publish()

    def on_stats(self, stats: dict) -> bool:
        """Note what a collector's stats say failed; True when the plan must be redone."""
        changed = stats.get("cpu") == 0 and self.plan["bpf"] and stats.get("pid") != self.plan.get("bpf_owner")
        for family, st in (stats.get("bpf") or {}).items():
            if isinstance(st, dict) and st.get("error") and family not in self.failed_bpf:
                log.error("eBPF family %s failed on cpu %s: %s", family, stats.get("cpu"), st["error"])
                self.failed_bpf[family] = st["error"]
                changed = True
        for src, st in (stats.get("filters") or {}).items():
            if isinstance(st, dict) and st.get("error") and src not in self.filter_errors:
                log.warning("kernel refused filter on %s (%s): the broker filters it", src, st["error"])
                self.filter_errors[src] = st["error"]
                changed = True
        for name, err in (stats.get("probes") or {}).items():
            if err:
                self.probe_errors[name] = err
        return bool(changed)

    # -- probes ------------------------------------------------------------------------------
    def validate_probe(self, category: str, probe: dict):
        """A ProbeDefinition for a kernel_call/user_call request, or a clear error."""
        from c8 import probes

        bad = set(probe) - {"symbol", "executable", "fetchargs", "return", "filter"}
        if bad:
            raise errors.ProtocolError(errors.BAD_SPEC, f"{category}: unknown probe keys {sorted(bad)}")
        if not isinstance(probe.get("symbol"), str):
            raise errors.ProtocolError(errors.BAD_SPEC, f"{category}: 'symbol' is required")
        if not isinstance(probe.get("fetchargs", ""), str):
            raise errors.ProtocolError(errors.BAD_SPEC, f"{category}: 'fetchargs' must be a string")
        try:
            if category == "kernel_call":
                return probes.kernel_probe(probe["symbol"], probe.get("fetchargs", ""), bool(probe.get("return")))
            if not isinstance(probe.get("executable"), str):
                raise errors.ProtocolError(errors.BAD_SPEC, "user_call: 'executable' is required")
            return probes.user_probe(probe["executable"], probe["symbol"], probe.get("fetchargs", ""),
                                     bool(probe.get("return")))
        except probes.KprobesUnavailable as exc:
            raise errors.ProtocolError(errors.UNSUPPORTED, str(exc)) from None
        except probes.ProbeError as exc:
            raise errors.ProtocolError(errors.BAD_SPEC, f"{category} {probe['symbol']!r}: {exc}") from None

    def probe_source(self, name: str) -> catalog.Source | None:
        if not name.startswith("c8probes:"):
            return None
        src = self.probe_sources.get(name)
        if src is None:
            src = self.probe_sources[name] = catalog.Source(name, _probe_builder(self, name))
        return src

    def probe_for(self, name: str):
        for sub in self.subscriptions:
            for filters in sub.categories.values():
                for cf in filters:
                    if cf.probe is not None and cf.probe["definition"].source == name:
                        return cf.probe["definition"], cf.category
        return None, None

    def probe_status(self) -> dict:
        return {name: {"definition": spec["definition"], "error": self.probe_errors.get(name.partition(":")[2])}
                for name, spec in self.plan["probes"].items()}


def compute_plan(subscriptions: list, *, failed_bpf: dict[str, str] | None = None,
                 filter_errors: dict[str, str] | None = None, own_pids: set[int] | frozenset = frozenset(),
                 own_tids: list[int] | None = None, bpf_owner: int | None = None, pushdown: bool = True,
                 dormant: bool = False) -> dict:
    """The plan (docs/INTERNALS.md) for these subscriptions: a pure function of them,
    the eBPF families and kernel filters that failed, the sensor's own pids (eBPF
    programs skip them) and threads (syscall tracepoint filters skip them), and config.

    Sources are the union of what each category filter can reach (its kinds, listed
    or implied by the expression); each tracepoint's kernel filter is the OR of the
    expressions that read it, when the kernel can express them all.
    """
    failed_bpf = failed_bpf or {}
    filter_errors = filter_errors or {}
    wanted: dict[str, list] = {}  # source -> expression nodes (None = everything)
    probes: dict[str, dict] = {}
    for sub in subscriptions:
        for category, filters in sub.categories.items():
            for cf in filters:
                if cf.probe is not None:
                    d = cf.probe["definition"]
                    probes[d.source] = {"definition": d.line}  # INTERNALS: plan "probes"
                    wanted.setdefault(d.source, []).append(cf.node)
                    continue
                for src in catalog.sources_for(category, cf.reach):
                    # process sources feed the tables: never filter them
                    node = None if src in catalog.PROCESS_SOURCES else cf.node
                    wanted.setdefault(src, []).append(node)
    if subscriptions:
        # Process and cgroup sources keep the process and container tables, which
        # stamp identity on every event: they run whenever anything is subscribed.
        for src in catalog.PROCESS_SOURCES + catalog.CGROUP_SOURCES:
            wanted.setdefault(src, []).append(None)
    tracepoints: dict[str, dict] = {}
    bpf: dict[str, dict] = {}
    ignore = sorted(own_pids)
    for src, nodes in wanted.items():
        src = _fallback(src, failed_bpf)
        source = catalog.SOURCES.get(src)
        if src.startswith("bpf:"):
            family = src[4:]
            flt: dict = {"ignore_tgids": ignore}
            if pushdown and source is not None and family in ("open", "file1", "file2"):
                bound = string_bound(nodes)
                if bound:
                    flt.update(bound)
            bpf[family] = {"filter": flt}
        else:
            fmap = source.kernel_fields if source else {}
            kf = None
            if pushdown and fmap and all(n is not None for n in nodes) and src not in filter_errors:
                try:
                    kf = expr.kernel_filter_any(nodes, fmap)
                except Exception as exc:
                    log.warning("no kernel filter for %s: %s", src, exc)
            if pushdown and src.startswith("raw_syscalls:") and src not in filter_errors:
                kf = _exclude_threads(kf, own_tids or [])
            tracepoints[src] = {"filter": kf}
    named = [bpf[f]["filter"] for f in ("open", "file1", "file2") if f in bpf]
    if named and all(_absolute_bound(f) for f in named):
        # only absolute names are collected: none needs a cwd or a dirfd (fchmod/fchown drop too)
        bpf.pop("cwd", None)
        for src in catalog.DUP_SOURCES:
            tracepoints.pop(src, None)
    # Collector cpu0 owns the eBPF maps: when it restarts, the others must fetch
    # the new map and plug their rings into it again.
    return {"enabled": bool(subscriptions) and not dormant, "tracepoints": tracepoints,
            "probes": probes, "bpf": bpf, "bpf_owner": bpf_owner if bpf else None}


def string_bound(nodes: list) -> dict | None:
    """eBPF prefix/exact filter covering every subscription's filename filter."""
    prefixes: set[str] = set()
    exact: set[str] = set()
    for node in nodes:
        if node is None:
            return None
        bound = expr.prefix_filter(node, "filename")
        if bound is None:
            return None
        prefixes.update(bound.get("prefixes", []))
        exact.update(bound.get("exact", []))
    if len(prefixes) + len(exact) > 8:
        return None  # more than the program's slots: collect everything
    return {"prefixes": sorted(prefixes), "exact": sorted(exact)}


def _absolute_bound(flt: dict) -> bool:
    """The eBPF name filter lets only absolute names through."""
    if "prefixes" not in flt and "exact" not in flt:
        return False
    return all(s.startswith("/") for s in [*flt.get("prefixes", []), *flt.get("exact", [])])


def _fallback(src: str, failed_bpf: dict[str, str]) -> str:
    family = src[4:] if src.startswith("bpf:") else None
    if family and family in failed_bpf and src in catalog.FALLBACK:
        return catalog.FALLBACK[src]
    return src


def own_threads(pids) -> list[int]:
    """Every thread of the sensor's processes (a tracepoint's common_pid is a thread id)."""
    return [tid for pid in sorted(pids) for tid in hostproc.tasks(pid)]


def _exclude_threads(kf: str | None, tids: list[int]) -> str | None:
    """Keep the sensor's own threads out of the syscall rings.

    The sensor makes syscalls of its own all the time (libzmq alone calls getpid on
    every send); the broker drops them anyway, so the kernel should not pay for them.
    """
    if not tids:
        return kf
    mine = " && ".join(f"common_pid != {t}" for t in tids)
    return mine if kf is None else f"({kf}) && {mine}"


def _probe_builder(planner: Planner, name: str):
    """kernel_call/user_call events from a probe's raw array: arg_<name> columns."""
    header = {"time", "cpu", "pid", "tid", "__probe_ip", "__probe_func", "__probe_ret_ip"}

    def build(raw: np.ndarray):
        definition, category = planner.probe_for(name)
        if definition is None:
            return []
        args = [f for f in raw.dtype.names if f not in header and not f.startswith("common_")]
        base_dt = schema.dtype(category)
        dt = np.dtype(base_dt.descr + [(schema.ARGUMENT_PREFIX + a, raw.dtype[a]) for a in args])
        out = np.zeros(len(raw), dt)
        tmp = schema.empty(category, len(raw))
        for f in base_dt.names:
            out[f] = tmp[f]
        out["sensor_monotime_nanos"] = raw["time"]
        out["cpu"] = raw["cpu"]
        out["process_pid"] = raw["pid"]
        out["process_tid"] = raw["tid"]
        out["kind"] = 2 if getattr(definition, "is_return", False) else 1
        out["symbol"] = definition.symbol.encode()
        out["probe"] = name.encode()
        if category == "user_call":
            out["executable"] = (definition.executable or "").encode()
        for a in args:
            out[schema.ARGUMENT_PREFIX + a] = raw[a]
        return [(category + ":" + name, out)]

    return build
