"""Subscriptions: a validated spec, its compiled filters, its caps and its losses.

A spec (docs/INTERNALS.md) names categories with optional filter expressions,
an optional container filter and modifiers. Everything is checked when the
subscription is made, so a bad spec is an error reply and never a broker fault.
"""

from __future__ import annotations

import itertools
import math
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from c8 import expr, schema
from c8.expr import glob
from c8.expr.errors import ExprLimitError
from c8.protocol import errors

_ids = itertools.count(1)

EVENT_CATEGORIES = ("process", "syscall", "file", "network", "container", "kernel_call", "user_call")


def _fail(reason: str) -> errors.ProtocolError:
    return errors.ProtocolError(errors.BAD_SPEC, reason)


@dataclass
class CategoryFilter:
    """One category of a subscription: its expression, compiled."""

    category: str
    text: str | None
    node: Any = None
    mask: Any = None  # fn(batch, containers) -> bool array
    kinds: set[str] | None = None  # the spec's "kinds" list, applied by the publisher
    probe: dict | None = None  # kernel_call/user_call: the probe wanted

    @property
    def reach(self) -> frozenset[str] | None:
        """The kinds this filter can match (the "kinds" list and the expression's
        ``kind`` predicates): the plan collects only their sources. None: all."""
        derived = expr.kinds_of(self.node, self.category)
        if self.kinds is None:
            return derived
        return frozenset(self.kinds) if derived is None else derived & frozenset(self.kinds)


@dataclass
class Subscription:
    sub_id: str
    peer: bytes
    spec: dict
    categories: dict[str, list[CategoryFilter]]
    container_filter: dict | None = None
    rate: float | None = None
    limit: int | None = None
    sent: int = 0
    lost_pending: dict[str, int] = field(default_factory=dict)
    lost_total: dict[str, int] = field(default_factory=dict)
    created: float = field(default_factory=time.monotonic)
    _tokens: float = 0.0
    _tokens_at: float = field(default_factory=time.monotonic)

    # -- losses ------------------------------------------------------------------
    def lose(self, source: str, n: int) -> None:
        if n > 0:
            self.lost_pending[source] = self.lost_pending.get(source, 0) + n
            self.lost_total[source] = self.lost_total.get(source, 0) + n

    # -- modifiers ---------------------------------------------------------------
    def admit(self, n: int, now: float) -> int:
        """How many of n events the rate and total caps let through now."""
        allowed = n
        if self.rate is not None:
            self._tokens = min(self.rate, self._tokens + (now - self._tokens_at) * self.rate)
            self._tokens_at = now
            allowed = min(allowed, int(self._tokens))
            self._tokens -= allowed
        if self.limit is not None:
            allowed = min(allowed, self.limit - self.sent)
        return max(allowed, 0)

    @property
    def finished(self) -> bool:
        return self.limit is not None and self.sent >= self.limit

    # -- containers --------------------------------------------------------------
    def container_mask(self, batch: np.ndarray, table: dict[int, tuple]) -> np.ndarray | None:
        """Which events pass the container filter (None: no container filter)."""
        cf = self.container_filter
        if not cf:
            return None
        ok = []
        for idx, row in table.items():
            if idx == 0:
                continue  # a container filter never admits the host
            cid, cname, iname = row[0], row[1], row[3]  # rows also carry runtime and Kubernetes slots
            if cf.get("image") and not glob.fnmatchcase(iname, cf["image"]):
                continue
            if cf.get("ids") and not any(cid.startswith(i) for i in cf["ids"]):
                continue
            if cf.get("names") and cname.lstrip("/") not in {n.lstrip("/") for n in cf["names"]}:
                continue
            ok.append(idx)
        return np.isin(batch["container"], np.array(ok, np.uint32))

    def describe(self) -> dict:
        return {"subscription": self.sub_id, "spec": self.spec, "sent": self.sent,
                "lost": dict(self.lost_total), "age_seconds": round(time.monotonic() - self.created, 1)}


@dataclass(frozen=True)
class FilterLimits:
    """Bounds on one filter's cost (configuration limits.*; docs/security.md)."""

    bytes: int = 65536
    terms: int = 1000
    number_digits: int = 32

    @classmethod
    def from_config(cls, limits: dict | None) -> FilterLimits:
        limits = limits or {}
        return cls(int(limits.get("filter_bytes", cls.bytes)), int(limits.get("filter_terms", cls.terms)),
                   int(limits.get("number_digits", cls.number_digits)))


_LIMIT_KEYS = {"terms": "limits.filter_terms", "number_digits": "limits.number_digits"}


def _compile(category: str, text: str | None, extra: dict[str, str] | None = None,
             limits: FilterLimits | None = None) -> CategoryFilter:
    cf = CategoryFilter(category, text)
    if text is None or text == "":
        return cf
    if not isinstance(text, str):
        raise errors.ProtocolError(errors.BAD_FILTER, f"{category}: filter must be a string")
    limits = limits or FilterLimits()
    size = len(text.encode("utf-8", "surrogatepass"))
    if size > limits.bytes:  # refused before parsing: the cost is in the parse
        raise errors.ProtocolError(errors.BAD_FILTER, f"{category} filter of {size} bytes: "
                                   f"at most {limits.bytes} (limits.filter_bytes)")
    try:
        cf.node = expr.parse(text, limits.number_digits, limits.terms)
        expr.check(cf.node, category, extra)
        cf.mask = expr.compile_mask(cf.node, category)
    except ExprLimitError as exc:
        raise errors.ProtocolError(errors.BAD_FILTER, f"{category} filter: {exc} ({_LIMIT_KEYS[exc.limit]})") from None
    except expr.ExprError as exc:
        raise errors.ProtocolError(errors.BAD_FILTER, f"{category} filter {text!r}: {exc}") from None
    return cf


def _kinds(category: str, value: Any) -> set[str] | None:
    if value is None:
        return None
    if not isinstance(value, list) or not all(isinstance(k, str) for k in value):
        raise _fail(f"{category}: 'kinds' must be a list of names")
    bad = [k for k in value if k.upper() not in schema.KINDS[category]]
    if bad:
        raise _fail(f"{category}: unknown kinds {bad}; known: {', '.join(schema.KINDS[category])}")
    return {k.upper() for k in value}


def parse_spec(spec: Any, peer: bytes, validate_probe=None, limits: FilterLimits | None = None) -> Subscription:
    """Validate a client's spec; raises ProtocolError naming what is wrong
    (BAD_FILTER naming the limits.* key when a filter passes ``limits``)."""
    if not isinstance(spec, dict):
        raise _fail("subscription spec must be a map")
    unknown = set(spec) - {"events", "containers", "modifiers"}
    if unknown:
        raise _fail(f"unknown spec keys: {sorted(unknown)}")
    events = spec.get("events")
    if not isinstance(events, dict) or not events:
        raise _fail("spec needs 'events': a map of event types to options")
    cats: dict[str, list[CategoryFilter]] = {}
    for category, opts in events.items():
        if category not in EVENT_CATEGORIES:
            raise _fail(f"unknown event type {category!r}; known: {', '.join(EVENT_CATEGORIES)}")
        if category in ("kernel_call", "user_call"):
            if not isinstance(opts, list) or not opts:
                raise _fail(f"{category}: expected a list of probes")
            cats[category] = []
            for probe in opts:
                if not isinstance(probe, dict):
                    raise _fail(f"{category}: each probe must be a map")
                definition = validate_probe(category, probe) if validate_probe else None
                extra = {schema.ARGUMENT_PREFIX + a.name: a.type.dtype().str.lstrip("<>|=")
                         for a in getattr(definition, "args", [])}
                cf = _compile(category, probe.get("filter"), extra, limits)
                cf.probe = {"spec": probe, "definition": definition}
                cats[category].append(cf)
            continue
        if opts is None:
            opts = {}
        if not isinstance(opts, dict):
            raise _fail(f"{category}: options must be a map (filter, kinds)")
        bad = set(opts) - {"filter", "kinds"}
        if bad:
            raise _fail(f"{category}: unknown options {sorted(bad)}")
        cf = _compile(category, opts.get("filter"), limits=limits)
        cf.kinds = _kinds(category, opts.get("kinds"))
        cats[category] = [cf]

    containers = spec.get("containers")
    if containers is not None:
        if not isinstance(containers, dict) or set(containers) - {"image", "ids", "names"}:
            raise _fail("'containers' must be a map with image (glob), ids, names")
        for key in ("ids", "names"):
            v = containers.get(key)
            if v is not None and (not isinstance(v, list) or not all(isinstance(x, str) for x in v)):
                raise _fail(f"containers.{key} must be a list of strings")
        if containers.get("image") is not None and not isinstance(containers["image"], str):
            raise _fail("containers.image must be a glob string")
        listed = len(containers.get("ids") or ()) + len(containers.get("names") or ())
        bound = (limits or FilterLimits()).terms  # each is a test per container per batch, as a term is
        if listed > bound:
            raise _fail(f"containers: {listed} ids and names: at most {bound} (limits.filter_terms)")
    modifiers = spec.get("modifiers") or {}
    if not isinstance(modifiers, dict) or set(modifiers) - {"rate", "limit"}:
        raise _fail("'modifiers' must be a map with rate (events/s) and limit (total)")
    rate = modifiers.get("rate")
    limit = modifiers.get("limit")
    for name, v in (("rate", rate), ("limit", limit)):
        if v is not None and (not isinstance(v, int | float) or isinstance(v, bool) or not 0 < v < math.inf):
            raise _fail(f"modifiers.{name} must be a positive number, got {v!r}")
    sub = Subscription(f"s{next(_ids)}", peer, spec, cats, containers or None,
                       float(rate) if rate else None, int(limit) if limit else None)
    sub._tokens = sub.rate or 0.0
    return sub
