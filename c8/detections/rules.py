"""Rule files: YAML lists of rules, lists and macros -> validated Rule objects.

    - list: shell_binaries
      items: [sh, bash, dash]
    - macro: spawned_shell
      condition: exec_filename like "*/sh" or exec_filename like "*/bash"
    - rule: Shell in container
      description: a shell ran inside a container
      priority: warning                # emergency alert critical error warning notice informational debug
      events: {process: [EXEC]}        # categories, each with optional kinds
      condition: spawned_shell and container_id is not null
      output: "shell {exec_filename} in {container_name} (pid {process_pid})"
      enabled: true
      tags: [container, shell]
      exceptions:                      # Falco-style: named sets of field values that never alert
        - name: known_shells
          fields: [container_image_name, exec_filename]   # a list of fields ...
          comps: [=, in]               # optional: = (default), ==, !=, <, <=, >, >=, like, in
          values:                      # ... and tuples of their values, one per field
            - [my/debug-image, [/bin/sh, /bin/bash]]
        - name: trusted_programs
          fields: process_exec_filename                   # one field: a list of values (comps: in)
          values: [/usr/bin/ansible, /usr/bin/salt]

Files load in order; a later item with the name of an earlier one replaces it,
or with ``append: true`` extends it (a rule's or macro's condition with
``and``, a list's items, a rule exception's values by its name, or new
exceptions); a rule item with only ``rule`` and ``enabled``
switches a rule on or off. Macros and lists are expanded textually once every
file is read, then each condition is parsed and type-checked against every
category the rule needs. Whatever is wrong (a YAML error, an unknown key, a
syntax error, an unknown macro, field or kind) becomes a RuleError naming the
file, the item and the problem; the other rules still load.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from c8 import schema
from c8.detections.alerts import placeholders, priority_name

RULE_KEYS = {"rule", "description", "priority", "events", "condition", "output", "enabled",
             "tags", "append", "exceptions"}
EXCEPTION_KEYS = {"name", "fields", "comps", "values"}
# Falco's comparison names -> the filter language's
EXCEPTION_COMPS = {"=": "==", "==": "==", "!=": "!=", "<": "<", "<=": "<=", ">": ">", ">=": ">=",
                   "like": "like", "in": "in"}
LIST_KEYS = {"list", "items", "append"}
MACRO_KEYS = {"macro", "condition", "append"}
KEYWORDS = frozenset({"and", "or", "not", "like", "in", "is", "null"})
# Names an output template may use besides event fields.
ALERT_FIELDS = frozenset({"rule", "priority", "time", "process_exec_filename", "process_command_line"})
MAX_EXPANSION_DEPTH = 32


@dataclass(frozen=True)
class RuleError:
    """A problem in a rule file; str() is the message shown to the user."""

    file: str
    item: str | None  # "rule 'x'", "macro 'y'", "list 'z'" or None (whole file)
    message: str

    def __str__(self) -> str:
        return f"{self.file}: {self.item}: {self.message}" if self.item else f"{self.file}: {self.message}"


@dataclass
class Rule:
    """A loaded rule. ``events`` maps category -> kind names (None: every kind);
    ``condition`` is the text as written (with appends), ``expanded`` after
    macro and list expansion, ``node`` its parsed form."""

    name: str
    priority: str
    events: dict[str, tuple[str, ...] | None]
    condition: str
    output: str
    description: str = ""
    enabled: bool = True
    tags: list[str] = field(default_factory=list)
    files: list[str] = field(default_factory=list)
    expanded: str = ""
    node: object = None
    exceptions: list[dict] = field(default_factory=list)

    @property
    def file(self) -> str:
        return self.files[-1] if self.files else "<rules>"


class Definitions:
    """Everything read from the files, in order, before expansion."""

    def __init__(self):
        self.rules: dict[str, dict] = {}     # name -> merged raw item (+ "files")
        self.lists: dict[str, list] = {}
        self.macros: dict[str, str] = {}
        self.macro_files: dict[str, str] = {}
        self.list_files: dict[str, str] = {}


def rule_files(paths) -> list[str]:
    """Files to load: each path itself, or a directory's *.yaml/*.yml in name order."""
    if isinstance(paths, str | os.PathLike):
        paths = [paths]
    out = []
    for p in paths:
        p = Path(p)
        if p.is_dir():
            out += sorted(str(f) for f in p.iterdir() if f.suffix in (".yaml", ".yml") and f.is_file())
        else:
            out.append(str(p))
    return out


def load_rules(paths) -> tuple[list[Rule], list[RuleError]]:
    """Load, merge, expand and check rules from files or directories.

    Returns the rules that loaded (disabled ones included, with enabled=False)
    and one RuleError per problem.
    """
    defs, errors = read_definitions(paths)
    rules = []
    for name, raw in defs.rules.items():
        rule = _build_rule(name, raw, defs, errors)
        if rule is not None:
            rules.append(rule)
    return rules, errors


def read_definitions(paths) -> tuple[Definitions, list[RuleError]]:
    """The raw, merged rules, lists and macros of files, before expansion."""
    defs, errors = Definitions(), []
    for path in rule_files(paths):
        _read_file(path, defs, errors)
    return defs, errors


def load_rules_text(text: str, name: str = "<text>") -> tuple[list[Rule], list[RuleError]]:
    """Rules from YAML text (for tests and `c8ctl` checks)."""
    defs, errors = Definitions(), []
    _read_items(_parse_yaml(text, name, errors), name, defs, errors)
    rules = [r for n, raw in defs.rules.items() if (r := _build_rule(n, raw, defs, errors))]
    return rules, errors


# ---- reading --------------------------------------------------------------------------

class _Loader(yaml.SafeLoader):
    """safe_load, with a bare ``=`` read as the string "=" (as Falco's rule files write
    exception comps: [=, in]); YAML 1.1 would make it a 'value' tag."""


_Loader.add_constructor("tag:yaml.org,2002:value", lambda loader, node: loader.construct_scalar(node))


def _parse_yaml(text: str, path: str, errors: list[RuleError]):
    try:
        return yaml.load(text, Loader=_Loader)  # noqa: S506 (a SafeLoader subclass)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or str(exc)
        errors.append(RuleError(path, None, f"YAML error{where}: {problem}; no rule of this file loaded"))
        return None
    except ValueError as exc:  # an integer too long for int() (over 4,300 digits)
        errors.append(RuleError(path, None, f"a number in the file is too long ({exc}); no rule of this file loaded"))
        return None


def _read_file(path: str, defs: Definitions, errors: list[RuleError]) -> None:
    try:
        text = Path(path).read_text()
    except OSError as exc:
        errors.append(RuleError(path, None, f"cannot read: {exc.strerror or exc}"))
        return
    _read_items(_parse_yaml(text, path, errors), path, defs, errors)


def _read_items(doc, path: str, defs: Definitions, errors: list[RuleError]) -> None:
    if doc is None:
        return
    if not isinstance(doc, list):
        errors.append(RuleError(path, None, "a rule file must be a list of rule, list and macro items"))
        return
    for i, item in enumerate(doc):
        if not isinstance(item, dict):
            errors.append(RuleError(path, f"item {i + 1}", f"must be a map, got {item!r}"))
            continue
        if "rule" in item:
            _read_rule(item, path, defs, errors)
        elif "list" in item:
            _read_list(item, path, defs, errors)
        elif "macro" in item:
            _read_macro(item, path, defs, errors)
        else:
            errors.append(RuleError(path, f"item {i + 1}",
                                    f"has none of rule, list, macro (keys: {', '.join(map(str, item))})"))


def _unknown_keys(item: dict, known: set[str]) -> str | None:
    unknown = sorted(str(k) for k in set(item) - known)
    if unknown:
        return f"unknown key(s) {', '.join(unknown)} (known: {', '.join(sorted(known))})"
    return None


def _read_rule(item: dict, path: str, defs: Definitions, errors: list[RuleError]) -> None:
    name = str(item["rule"])
    where = f"rule '{name}'"
    if problem := _unknown_keys(item, RULE_KEYS):
        errors.append(RuleError(path, where, problem))
        return
    if not isinstance(item["rule"], str):
        errors.append(RuleError(path, where, f"the rule name must be a string (quote it), got {item['rule']!r}"))
        return
    if "condition" in item and not isinstance(item["condition"], str):
        errors.append(RuleError(path, where, "condition must be a string"))
        return
    old = defs.rules.get(name)
    if "exceptions" in item:
        try:
            item = {**item, "exceptions": read_exceptions(item["exceptions"], appending=bool(item.get("append")))}
        except ValueError as exc:
            errors.append(RuleError(path, where, str(exc)))
            return
    if item.get("append"):
        if old is None:
            errors.append(RuleError(path, where, "append: true, but no earlier rule of that name"))
            return
        merged = dict(old)
        for k, v in item.items():
            if k == "condition":
                merged["condition"] = f"({old['condition']}) and ({v})"
            elif k == "exceptions":
                try:
                    merged["exceptions"] = merge_exceptions(old.get("exceptions") or [], v)
                except ValueError as exc:
                    errors.append(RuleError(path, where, str(exc)))
                    return
            elif k != "append":
                merged[k] = v
        merged["files"] = old["files"] + [path]
        defs.rules[name] = merged
    elif set(item) <= {"rule", "enabled", "append"}:
        if old is None:
            errors.append(RuleError(path, where, "only 'enabled' given, but no earlier rule of that name"))
            return
        defs.rules[name] = {**old, **item, "files": old["files"] + [path]}   # switch on/off
    else:
        defs.rules[name] = {**item, "files": [path]}


def _read_list(item: dict, path: str, defs: Definitions, errors: list[RuleError]) -> None:
    name = str(item["list"])
    where = f"list '{name}'"
    if problem := _unknown_keys(item, LIST_KEYS):
        errors.append(RuleError(path, where, problem))
        return
    items = item.get("items")
    if not isinstance(items, list) or not all(isinstance(v, str | int) and not isinstance(v, bool)
                                              for v in items):
        errors.append(RuleError(path, where, "items must be a list of strings or integers"))
        return
    if item.get("append") and name in defs.lists:
        defs.lists[name] = defs.lists[name] + items
    else:
        defs.lists[name] = list(items)
    defs.list_files[name] = path


def _read_macro(item: dict, path: str, defs: Definitions, errors: list[RuleError]) -> None:
    name = str(item["macro"])
    where = f"macro '{name}'"
    if problem := _unknown_keys(item, MACRO_KEYS):
        errors.append(RuleError(path, where, problem))
        return
    cond = item.get("condition")
    if not isinstance(cond, str) or not cond.strip():
        errors.append(RuleError(path, where, "condition must be a non-empty string"))
        return
    if item.get("append") and name in defs.macros:
        defs.macros[name] = f"({defs.macros[name]}) and ({cond})"
    else:
        defs.macros[name] = cond
    defs.macro_files[name] = path


# ---- exceptions ---------------------------------------------------------------------------

def read_exceptions(value, appending: bool = False) -> list[dict]:
    """A rule's ``exceptions`` (Falco's shape), checked and normalised to
    {name, fields: [..], comps: [..], values: [[..], ..], single: bool}; raises
    ValueError naming the exception and the problem. When ``appending``, an item
    may give only name and values (values added to the exception of that name)."""
    if not isinstance(value, list):
        raise ValueError("exceptions must be a list of {name, fields, comps, values} maps")
    out, seen = [], set()
    for i, exc in enumerate(value):
        if not isinstance(exc, dict) or not isinstance(exc.get("name"), str) or not exc["name"]:
            raise ValueError(f"exceptions[{i}] must be a map with a name")
        where = f"exception '{exc['name']}'"
        if exc["name"] in seen:
            raise ValueError(f"{where} is given twice")
        seen.add(exc["name"])
        unknown = sorted(str(k) for k in set(exc) - EXCEPTION_KEYS)
        if unknown:
            raise ValueError(f"{where}: unknown key(s) {', '.join(unknown)} (known: {', '.join(sorted(EXCEPTION_KEYS))})")
        values = exc.get("values") or []
        if not isinstance(values, list):
            raise ValueError(f"{where}: values must be a list")
        if "fields" not in exc:
            if not appending:
                raise ValueError(f"{where}: missing fields")
            out.append({"name": exc["name"], "values": values})
            continue
        fields = exc["fields"]
        single = isinstance(fields, str)
        fields = [fields] if single else fields
        if not isinstance(fields, list) or not fields or not all(isinstance(f, str) and f for f in fields):
            raise ValueError(f"{where}: fields must be a field name or a list of field names")
        comps = exc.get("comps", "in" if single else ["="] * len(fields))
        comps = [comps] if isinstance(comps, str) else comps
        if not isinstance(comps, list) or len(comps) != len(fields):
            raise ValueError(f"{where}: comps must give one comparison per field ({len(fields)})")
        bad = [c for c in comps if c not in EXCEPTION_COMPS]
        if bad:
            raise ValueError(f"{where}: unknown comparison(s) {', '.join(map(str, bad))} "
                             f"(known: {', '.join(EXCEPTION_COMPS)})")
        norm = {"name": exc["name"], "fields": fields, "comps": [EXCEPTION_COMPS[c] for c in comps],
                "single": single, "values": []}
        out.append(norm)
        norm["values"] = _exception_values(norm, values, where)
    return out


def _exception_values(exc: dict, values: list, where: str) -> list[list]:
    def scalar(v) -> bool:
        return isinstance(v, str | int) and not isinstance(v, bool)

    if exc["single"]:  # one field: a flat list of values
        if not all(scalar(v) for v in values):
            raise ValueError(f"{where}: values of a one-field exception must be strings or integers")
        return [[v] for v in values] if exc["comps"][0] != "in" else ([[list(values)]] if values else [])
    n = len(exc["fields"])
    for row in values:
        if not isinstance(row, list) or len(row) != n:
            raise ValueError(f"{where}: each value must be a list of {n} (one per field: "
                             f"{', '.join(exc['fields'])}), got {row!r}")
        for v, comp in zip(row, exc["comps"], strict=True):
            ok = (scalar(v) or (isinstance(v, list) and v and all(scalar(x) for x in v))) if comp == "in" \
                else scalar(v)
            if not ok:
                raise ValueError(f"{where}: {v!r} is no value for '{comp}' (a string or an integer"
                                 + (", or a list of them" if comp == "in" else "") + ")")
    return [list(r) for r in values]


def merge_exceptions(old: list[dict], new: list[dict]) -> list[dict]:
    """An appended rule's exceptions: values added to the old exception of the same
    name, whole new exceptions added; raises ValueError for values of no exception."""
    merged = [dict(e) for e in old]
    by_name = {e["name"]: e for e in merged}
    for e in new:
        if e["name"] in by_name:
            target = by_name[e["name"]]
            target["values"] = target["values"] + _exception_values(target, e["values"], f"exception '{e['name']}'")
        elif "fields" not in e:
            raise ValueError(f"exception '{e['name']}': values appended to no exception of that name "
                             f"(known: {', '.join(by_name) or 'none'})")
        else:
            merged.append(e)
            by_name[e["name"]] = e
    return merged


def exception_condition(exc: dict, lists: dict[str, list]) -> str | None:
    """``(f1 c1 v1 and f2 c2 v2) or ...`` for one exception's values; None without values.
    A string given to ``in`` that names a list stands for its items."""
    rows = []
    for row in exc["values"]:
        terms = []
        for f, comp, v in zip(exc["fields"], exc["comps"], row, strict=True):
            if comp == "in":
                items = v if isinstance(v, list) else [v]
                text = ", ".join(x if isinstance(x, str) and x in lists else _literal(x) for x in items)
                terms.append(f"{f} in ({text})")
            else:
                terms.append(f"{f} {comp} {_literal(v)}")
        rows.append("(" + " and ".join(terms) + ")")
    return " or ".join(rows) if rows else None


# ---- expansion --------------------------------------------------------------------------

class ExpansionError(ValueError):
    pass


def _tokens(text: str) -> list[tuple[str, str]]:
    """(kind, text) tokens: 'str', 'name' or 'other' (whitespace kept in 'other')."""
    out, i, n = [], 0, len(text)
    while i < n:
        c = text[i]
        if c in "\"'":
            j = i + 1
            while j < n and text[j] != c:
                j += 2 if text[j] == "\\" else 1
            out.append(("str", text[i:j + 1]))
            i = j + 1
        elif c.isdigit():  # a number, hex included: never a name
            j = i + 1
            while j < n and (text[j].isalnum() or text[j] == "_"):
                j += 1
            out.append(("other", text[i:j]))
            i = j
        elif c.isalpha() or c == "_":
            j = i + 1
            while j < n and (text[j].isalnum() or text[j] == "_"):
                j += 1
            out.append(("name", text[i:j]))
            i = j
        else:
            out.append(("other", c))
            i += 1
    return out


def _literal(v) -> str:
    if isinstance(v, int):
        return str(v)
    return '"' + v.replace("\\", "\\\\").replace('"', '\\"') + '"'


def expand(text: str, macros: dict[str, str], lists: dict[str, list], _depth: int = 0,
           _stack: tuple[str, ...] = ()) -> str:
    """Replace macro names (bare words) by their parenthesised conditions and
    list names by their comma-separated items; raises ExpansionError."""
    if _depth > MAX_EXPANSION_DEPTH:
        raise ExpansionError(f"macros nest deeper than {MAX_EXPANSION_DEPTH}")
    toks = _tokens(text)
    out = []
    for i, (kind, tok) in enumerate(toks):
        if kind != "name" or tok.lower() in KEYWORDS:
            out.append(tok)
            continue
        if tok in macros:
            if tok in _stack:
                raise ExpansionError(f"macro '{tok}' refers to itself ({' -> '.join(_stack + (tok,))})")
            out.append("(" + expand(macros[tok], macros, lists, _depth + 1, _stack + (tok,)) + ")")
        elif tok in lists:
            if not lists[tok]:
                raise ExpansionError(f"list '{tok}' is empty")
            out.append(", ".join(_expand_list_item(v, lists, _depth) for v in lists[tok]))
        else:
            nxt = next((t for k, t in toks[i + 1:] if not t.isspace()), None)
            if nxt is None or nxt.lower() in ("and", "or"):
                raise ExpansionError(f"unknown macro '{tok}'")
            if nxt in (",", ")"):
                raise ExpansionError(f"unknown list or macro '{tok}'")
            out.append(tok)
    return "".join(out)


def _expand_list_item(v, lists: dict[str, list], depth: int) -> str:
    # a list may name another list among its items (as Falco allows)
    if isinstance(v, str) and v in lists and depth < MAX_EXPANSION_DEPTH:
        return ", ".join(_expand_list_item(x, lists, depth + 1) for x in lists[v])
    return _literal(v)


# ---- building ----------------------------------------------------------------------------

def _parse_events(value) -> dict[str, tuple[str, ...] | None]:
    """events: [process, file] | {file: [OPEN], network: null} | [{file: [OPEN]}, process]."""
    if isinstance(value, str):
        value = [value]
    pairs: list[tuple[str, object]] = []
    if isinstance(value, dict):
        pairs = list(value.items())
    elif isinstance(value, list):
        for v in value:
            if isinstance(v, dict):
                pairs += list(v.items())
            else:
                pairs.append((v, None))
    else:
        raise ValueError("events must be a list of categories or a map category -> kinds")
    if not pairs:
        raise ValueError("events is empty: name the categories the rule needs")
    out: dict[str, tuple[str, ...] | None] = {}
    for cat, kinds in pairs:
        if cat not in schema.KINDS:
            raise ValueError(f"unknown event category {cat!r} (known: {', '.join(schema.CATEGORIES)})")
        if kinds is None:
            out[cat] = None
            continue
        kinds = [kinds] if isinstance(kinds, str) else kinds
        if not isinstance(kinds, list) or not kinds:
            raise ValueError(f"kinds of {cat} must be a list of names")
        bad = [k for k in kinds if k not in schema.KINDS[cat]]
        if bad:
            raise ValueError(f"unknown kind(s) {', '.join(map(str, bad))} of {cat} events "
                             f"(kinds: {', '.join(schema.KINDS[cat])})")
        out[cat] = tuple(kinds)
    return out


def _build_rule(name: str, raw: dict, defs: Definitions, errors: list[RuleError]) -> Rule | None:
    from c8.expr import ExprError, check, parse  # the filter language

    path = raw["files"][-1]
    where = f"rule '{name}'"

    def fail(msg: str) -> None:
        errors.append(RuleError(path, where, msg))

    missing = [k for k in ("condition", "output", "priority", "events") if k not in raw]
    if missing:
        fail(f"missing {', '.join(missing)}")
        return None
    try:
        priority = priority_name(raw["priority"])
        events = _parse_events(raw["events"])
    except ValueError as exc:
        fail(str(exc))
        return None
    if not isinstance(raw["output"], str):
        fail("output must be a string template")
        return None
    tags = raw.get("tags") or []
    if not isinstance(tags, list):
        fail("tags must be a list")
        return None
    enabled = raw.get("enabled", True)
    if not isinstance(enabled, bool):
        fail(f"enabled must be true or false, got {enabled!r}")
        return None
    exceptions = raw.get("exceptions") or []
    for e in exceptions:  # each on its own first: an error names the exception
        if "fields" not in e:
            fail(f"exception '{e['name']}': values appended to no exception of that name")
            return None
        text = exception_condition(e, defs.lists)
        if text is None:
            continue
        try:
            enode = parse(expand(text, defs.macros, defs.lists))
            for cat in events:
                check(enode, cat)
        except (ExpansionError, ExprError) as exc:
            fail(f"exception '{e['name']}': {exc}")
            return None
    condition = raw["condition"]
    parts = [t for e in exceptions if (t := exception_condition(e, defs.lists))]
    if parts:
        condition = f"({condition})" + "".join(f" and not ({t})" for t in parts)
    try:
        expanded = expand(condition, defs.macros, defs.lists)
    except ExpansionError as exc:
        fail(str(exc))
        return None
    try:
        node = parse(expanded)
    except ExprError as exc:
        detail = f" (after expanding macros and lists: {expanded})" if expanded != raw["condition"] else ""
        fail(f"condition: {exc}{detail}")
        return None
    for cat in events:
        try:
            check(node, cat)
        except ExprError as exc:
            fail(f"condition on {cat} events: {exc}")
            return None
    known = set(ALERT_FIELDS)
    for cat in events:
        known.update(f.name for f in schema.fields(cat))
    # parent.* / ancestor.* are for filters only: an alert shows parent_exec_filename, the lineage
    unknown = [p for p in placeholders(raw["output"]) if p not in known or "." in p]
    if unknown:
        fail(f"output uses unknown field(s) {', '.join('{' + u + '}' for u in unknown)}")
        return None
    return Rule(name=name, priority=priority, events=events, condition=raw["condition"],
                output=raw["output"], description=str(raw.get("description") or ""),
                enabled=enabled, tags=[str(t) for t in tags], files=list(raw["files"]),
                expanded=expanded, node=node, exceptions=list(exceptions))


def default_rules_path() -> str:
    """The packaged default rules directory, c8/detections/default_rules/ (its
    default.yaml links to conf/rules/default.yaml in the source tree)."""
    return str(Path(__file__).with_name("default_rules"))


def __getattr__(name: str):
    # the engine lives in engine.py; importable from here as the brief's API names it
    if name == "Engine":
        from c8.detections.engine import Engine
        return Engine
    raise AttributeError(name)
