"""c8ctl: manage subscriptions and look at a running sensor.

    c8ctl status                      children, subscriptions, collection, losses
    c8ctl subscribe --events process  stream events as JSON lines until interrupted
    c8ctl subscriptions               list live subscriptions
    c8ctl unsubscribe ID              end one
    c8ctl probes                      kernel/user probes in use
    c8ctl reload                      re-read the configuration and rule files (root)
    c8ctl fields [CATEGORY]           the event field table (--markdown: docs/events.md)
    c8ctl record --events process -o F.parquet [--count N | --duration D]   a capture
    c8ctl replay F.parquet [--rules PATH]   the detection rules over a capture: alerts
    c8ctl rules list                  the detector's rules: files, matches, alerts
    c8ctl rules test FILE...          check rule files without a sensor (exit 1 on errors)
    c8ctl top                         live view: rates, losses, subscriptions, children
    c8ctl fleet subscribe --nats URL  the fleet's events from NATS JetStream (docs/export.md)
    c8ctl fleet sensors --nats URL    the sensors exporting to the stream

The sensor is found through run_dir: --run-dir, else CAPSULE8_RUN_DIR, else the
config file's run_dir, else /var/run/capsule8.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys

import yaml

from c8 import schema
from c8.clients import jsonlines
from c8.clients.client import Client, SensorError, SensorUnavailable
from c8.supervisor import status as supervisor_status


def find_run_dir(explicit: str | None) -> str | None:
    """run_dir the way the service finds it: flag, env, config file."""
    if explicit:
        return explicit
    if os.environ.get("CAPSULE8_RUN_DIR"):
        return os.environ["CAPSULE8_RUN_DIR"]
    path = os.environ.get("CAPSULE8_CONFIG", "/etc/capsule8/capsule8-sensor.yaml")
    try:
        with open(path) as f:
            data = yaml.safe_load(f) or {}
        if isinstance(data, dict) and isinstance(data.get("run_dir"), str):
            return data["run_dir"]
    except (OSError, yaml.YAMLError):
        pass
    return None


def build_spec(args: argparse.Namespace) -> dict:
    """A subscription spec from --spec FILE and/or --events/--filter/--image flags."""
    spec: dict = {}
    if args.spec:
        with open(args.spec) as f:
            spec = yaml.safe_load(f) or {}
    events = spec.setdefault("events", {})
    for item in (args.events or "").split(","):
        item = item.strip()
        if item:
            events.setdefault(item, {})
    if args.filter:
        for category in list(events):
            if category not in ("kernel_call", "user_call"):
                events[category] = dict(events[category] or {}, filter=args.filter)
    if args.image:
        spec.setdefault("containers", {})["image"] = args.image
    mods = {k: v for k, v in (("rate", args.rate), ("limit", args.limit)) if v}
    if mods:
        spec.setdefault("modifiers", {}).update(mods)
    return spec


def write_whole(out, data: bytes) -> None:
    """Write and flush ``data`` with Ctrl-C held until it is out: a reader (jq) never
    gets half a line. A second Ctrl-C while the write blocks (a reader that stopped
    reading) interrupts it at once."""
    pending: list[int] = []

    def hold(signum, _frame):
        if pending:
            raise KeyboardInterrupt
        pending.append(signum)
    previous = signal.signal(signal.SIGINT, hold)
    try:
        out.write(data)
        out.flush()
    finally:
        signal.signal(signal.SIGINT, previous)
    if pending:
        raise KeyboardInterrupt


def cmd_subscribe(client: Client, args: argparse.Namespace) -> int:
    """JSON lines on stdout, each window's events in sensor sequence order, one
    write per window; a loss (this reader too slow, the kernel's ring full) is a
    ``lost`` line where it happened."""
    spec = build_spec(args)
    if not spec.get("events"):
        print("c8ctl subscribe: name event types with --events or --spec", file=sys.stderr)
        return 2
    out = sys.stdout.buffer
    with client.subscribe(spec) as sub:
        print(json.dumps({"subscription": sub.id}), file=sys.stderr)
        try:
            for window in sub.windows(timeout=args.timeout):
                write_whole(out, jsonlines.window_lines(window, sub.sensor_id))
        except KeyboardInterrupt:
            pass
        except BrokenPipeError:  # the reader is gone (| head): end quietly, as cat does
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            return 0
        if sub.ended:
            print(json.dumps({"ended": sub.ended}), file=sys.stderr)
    return 0


def cmd_status(client: Client, args: argparse.Namespace) -> int:
    st = client.status()
    if args.json:
        print(json.dumps(st, indent=2, default=str))
        return 0
    sup = st.get("supervisor") or {}
    print(f"sensor {st.get('sensor_id', '')[:16]}  broker pid {st.get('broker_pid')}  supervisor pid {sup.get('pid', '?')}")
    for child in sup.get("children", []):
        print(f"  {child.get('name', '?'):24} pid {child.get('pid')}  {child.get('state', '')}  restarts {child.get('restarts', 0)}")
    plan = st.get("plan") or {}
    print(f"collection {'enabled' if plan.get('enabled') else 'idle'} (plan {plan.get('generation')}), dormant={st.get('dormant')}")
    for tp, opts in sorted((plan.get("tracepoints") or {}).items()):
        print(f"  tracepoint {tp}" + (f"  filter: {opts['filter']}" if opts.get("filter") else ""))
    for fam in sorted(plan.get("bpf") or {}):
        print(f"  ebpf {fam}")
    for name, line in sorted((plan.get("probes") or {}).items()):
        print(f"  probe {name}: {line}")
    for cpu, c in sorted((st.get("collectors") or {}).items(), key=lambda kv: int(kv[0])):
        received = sum((c.get("received") or {}).values())
        print(f"  cpu{cpu}: pid {c.get('pid')} received {received} lost {c.get('lost', 0)}")
    reload = sup.get("reload")
    if reload:
        line = f"reload {reload.get('generation')}: {reload.get('state')} at {reload.get('time')}"
        if reload.get("error"):
            line += f": {reload['error']}"
        if reload.get("restart_needed"):
            line += f"; restart needed for {', '.join(reload['restart_needed'])}"
        print(line)
    print(f"counts: {st.get('counts')}")
    print(f"containers: {st.get('containers')}")  # lookups that left names unknown, by cause
    _print_export(client.run_dir)
    print(f"subscriptions: {len(st.get('subscriptions', []))}")
    for s in st.get("subscriptions", []):
        print(f"  {s['subscription']}: sent {s['sent']} lost {s['lost']} events {sorted(s['spec'].get('events', {}))}")
    return 0


def _print_export(run_dir: str) -> None:
    """The exporter's line (its <run_dir>/export.json), when it runs."""
    try:
        with open(os.path.join(run_dir, "export.json")) as f:
            ex = json.load(f)
        os.kill(int(ex["pid"]), 0)
    except (OSError, ValueError, KeyError, TypeError):
        return
    state = f"connected to {ex.get('server')}" if ex.get("connected") else "not connected"
    error = f"  error: {ex['last_error']}" if ex.get("last_error") and not ex.get("connected") else ""
    print(f"export: stream {ex.get('stream')} {state}  published {ex.get('published', 0)}"
          f"  spool {ex.get('spool_bytes', 0)} bytes  lost {ex.get('lost', 0)} (source export){error}")


def cmd_subscriptions(client: Client, args: argparse.Namespace) -> int:
    for s in client.subscriptions():
        print(json.dumps(s, default=str))
    return 0


def cmd_unsubscribe(client: Client, args: argparse.Namespace) -> int:
    client.unsubscribe(args.id)
    return 0


def cmd_probes(client: Client, args: argparse.Namespace) -> int:
    print(json.dumps(client.request("probes").get("probes", {}), indent=2))
    return 0


def cmd_reload(client: Client, args: argparse.Namespace) -> int:
    """Ask the supervisor to re-read the configuration and the rule files (SIGHUP,
    so root only), wait for its verdict in supervisor.json and print it: exit 0
    when accepted, 1 when refused (the running configuration stays)."""
    import signal
    import time

    path = os.path.join(client.run_dir, "supervisor.json")

    def current() -> dict:
        try:
            with open(path) as f:
                return json.load(f)
        except FileNotFoundError:
            raise SensorUnavailable(f"no {path}: is the sensor running?") from None

    sup = current()
    pid = int(sup.get("pid") or 0)
    if not supervisor_status.is_supervisor(pid):
        raise SensorUnavailable(f"{path} names pid {pid}, which is no c8-supervisor")
    before = (sup.get("reload") or {}).get("generation", 0)
    try:
        os.kill(pid, signal.SIGHUP)
    except PermissionError:
        print("c8ctl reload: only root may signal the supervisor", file=sys.stderr)
        return 1
    deadline = time.monotonic() + args.timeout
    while time.monotonic() < deadline:
        reload = current().get("reload") or {}
        if reload.get("generation", 0) > before and reload.get("state") != "pending":
            print(json.dumps(reload, indent=2))
            return 0 if reload.get("state") == "accepted" else 1
        time.sleep(0.1)
    print(f"c8ctl reload: no verdict within {args.timeout:.0f}s", file=sys.stderr)
    return 1


def cmd_fields(_client, args: argparse.Namespace) -> int:
    if args.markdown:
        from c8.schema import docs
        sys.stdout.write(docs.markdown())
        return 0
    cats = [args.category] if args.category else list(schema.CATEGORIES)
    for c in cats:
        print(f"{c}: kinds {', '.join(schema.KINDS[c])}")
        for f in schema.fields(c):
            print(f"  {f.name:26} {f.dtype:6} {f.description}")
    return 0


def cmd_record(client: Client, args: argparse.Namespace) -> int:
    """Events to a Parquet capture until --count events, --duration or Ctrl-C
    (c8.clients.capture; docs/captures.md)."""
    from c8.clients import capture

    duration = capture.parse_duration(args.duration) if args.duration is not None else None
    if args.count is not None and args.count <= 0:
        raise ValueError(f"--count must be a positive number of events, got {args.count}")
    spec = build_spec(argparse.Namespace(spec=None, events=args.events, filter=args.filter,
                                         image=args.image, rate=None, limit=None))
    if not spec.get("events"):
        print("c8ctl record: name event types with --events", file=sys.stderr)
        return 2
    with client.subscribe(spec, queue=256) as sub:
        print(json.dumps({"subscription": sub.id, "output": args.output}), file=sys.stderr)
        stats = capture.record(sub, args.output, count=args.count, duration=duration)
    print(json.dumps(stats), file=sys.stderr)
    return 0


def cmd_replay(_client, args: argparse.Namespace) -> int:
    """A capture through the detection rules as fast as it goes; alerts as JSON lines
    (as the detector's stdout output writes them), a summary on stderr."""
    import time

    from c8.clients import capture
    from c8.detections.engine import Engine
    from c8.detections.outputs.base import alert_dict
    from c8.detections.rules import default_rules_path, load_rules

    rules, errors = load_rules(args.rules or [default_rules_path()])
    for err in errors:
        print(f"c8ctl replay: rule not loaded: {err}", file=sys.stderr)
    if errors:
        return 2
    engine = Engine(rules)
    start = time.perf_counter()
    events = alerts = 0
    out = sys.stdout
    try:
        for _category, arr, found in capture.replay(args.file, engine):
            events += len(arr)
            alerts += len(found)
            for alert in found:
                out.write(json.dumps(alert_dict(alert), default=str) + "\n")
        out.flush()
    except BrokenPipeError:  # the reader is gone (| head): end quietly, as cat does
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    seconds = time.perf_counter() - start
    print(json.dumps({"events": events, "alerts": alerts, "rules": len(engine.rules),
                      "seconds": round(seconds, 3),
                      "events_per_second": round(events / seconds) if seconds else None}), file=sys.stderr)
    return 0


def cmd_top(client: Client, args: argparse.Namespace) -> int:
    """A live view refreshed every --interval seconds; q or Ctrl-C ends it."""
    from c8.clients import top

    return top.run(client, interval=args.interval, once=args.once)


def cmd_fleet_subscribe(_client, args: argparse.Namespace) -> int:
    """JSON lines from the JetStream stream the sensors export to, with sensor_id;
    follows new messages until interrupted (or --timeout idle seconds)."""
    from c8.clients.fleet import Fleet, parse_duration

    events = [e.strip() for e in (args.events or "").split(",") if e.strip()] or None
    since = parse_duration(args.since) if args.since else None
    out = sys.stdout.buffer
    with Fleet(args.nats, args.stream) as fleet:
        try:
            for chunk in fleet.lines(events, args.filter, args.image, sensor=args.sensor,
                                     since=since, all=args.all, timeout=args.timeout):
                out.write(chunk)
                out.flush()
        except KeyboardInterrupt:
            pass
        except BrokenPipeError:
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        except (ValueError, yaml.YAMLError):
            raise  # a bad filter: main names it
        except Exception as exc:  # nats-py's errors (timeouts, no stream) carry no text
            return _fleet_error(exc, args)
    return 0


def _fleet_error(exc: Exception, args: argparse.Namespace) -> int:
    what = f"no stream {args.stream!r}" if type(exc).__name__ == "NotFoundError" else repr(exc)
    print(f"c8ctl fleet: {what} (servers {args.nats})", file=sys.stderr)
    return 1


def cmd_fleet_sensors(_client, args: argparse.Namespace) -> int:
    """The sensors in the stream: last seen, events exported, lost (JSON lines)."""
    from c8.clients.fleet import Fleet

    with Fleet(args.nats, args.stream) as fleet:
        try:
            rows = fleet.sensors()
        except Exception as exc:  # nats-py's errors (timeouts, no stream) carry no text
            return _fleet_error(exc, args)
    for row in rows:
        print(json.dumps(row))
    return 0


def cmd_rules_list(client: Client, args: argparse.Namespace) -> int:
    """The running detector's rules (its run_dir/detector.json): priority, enabled,
    matching events and alerts sent (folded alerts count once), source files."""
    from c8.protocol import paths

    path = paths.detector_stats(client.run_dir)
    try:
        with open(path) as f:
            det = json.load(f)
        os.kill(int(det["pid"]), 0)
    except FileNotFoundError:
        raise SensorUnavailable(f"no {path}: is the sensor running with detections.enabled?") from None
    except (ProcessLookupError, KeyError, TypeError, ValueError):
        raise SensorUnavailable(f"{path} names no running detector") from None
    table = det.get("rule_table") or []
    if args.json:
        print(json.dumps(table, indent=2))
        return 0
    print(f"{'rule':44} {'priority':9} {'on':3} {'matches':>8} {'alerts':>7}  files")
    for r in table:
        print(f"{r['rule'][:44]:44} {r['priority']:9} {'yes' if r['enabled'] else 'no':3} "
              f"{r['matches']:>8} {r['alerts']:>7}  {', '.join(r['files'])}")
    print(f"{sum(r['enabled'] for r in table)} rules enabled of {len(table)} loaded")
    return 0


def cmd_rules_test(_client, args: argparse.Namespace) -> int:
    """Load rule files as the detector would (``--with-defaults``: after the packaged
    rules, whose macros and lists they may use) and compile every rule; print each
    problem as FILE: rule 'NAME': PROBLEM. Exit 1 when any is found."""
    from c8.detections.engine import Engine
    from c8.detections.rules import default_rules_path, load_rules

    missing = [f for f in args.files if not os.path.exists(f)]
    if missing:
        print(f"c8ctl rules test: no such file: {', '.join(missing)}", file=sys.stderr)
        return 1
    rules, errors = load_rules(([default_rules_path()] if args.with_defaults else []) + args.files)
    for err in errors:
        print(str(err), file=sys.stderr)
    try:
        engine = Engine(rules)
    except Exception as exc:  # a rule the mask compiler refuses
        print(f"c8ctl rules test: rules do not compile: {exc}", file=sys.stderr)
        return 1
    print(f"{len(engine.rules)} rules enabled of {len(rules)} loaded, {len(errors)} errors")
    return 1 if errors else 0


def _fleet_parser(sub) -> None:
    fl = sub.add_parser("fleet", help="read the fleet from NATS JetStream (docs/export.md)")
    fsub = fl.add_subparsers(dest="fleet_command", required=True)
    for name, fn, text in (("subscribe", cmd_fleet_subscribe, "stream the fleet's events"),
                           ("sensors", cmd_fleet_sensors, "the sensors in the stream")):
        f = fsub.add_parser(name, help=text)
        f.add_argument("--nats", default=os.environ.get("NATS_URL", "nats://127.0.0.1:4222"),
                       help="server URL(s), comma separated (default $NATS_URL or local)")
        f.add_argument("--stream", default="C8", help="the stream (default C8)")
        f.set_defaults(fn=fn)
        if name != "subscribe":
            continue
        f.add_argument("--events", help="comma-separated event types (and alerts); default all")
        f.add_argument("--filter", help="filter expression applied to each event type")
        f.add_argument("--image", help="only containers whose image name matches this glob")
        f.add_argument("--sensor", help="only this sensor id")
        when = f.add_mutually_exclusive_group()
        when.add_argument("--since", help="start this long ago (90s, 15m, 2h, 1d)")
        when.add_argument("--all", action="store_true", help="start at the stream's first message")
        f.add_argument("--timeout", type=float, default=None, help="stop after this many idle seconds")


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="c8ctl", description=__doc__.split("\n\n")[0])
    p.add_argument("--run-dir", help="the sensor's run_dir (default: from CAPSULE8_RUN_DIR or the config)")
    sub = p.add_subparsers(dest="command", required=True)
    s = sub.add_parser("subscribe", help="stream events as JSON lines")
    s.add_argument("--events", help="comma-separated event types: process,file,syscall,network,container")
    s.add_argument("--filter", help="filter expression applied to each event type")
    s.add_argument("--image", help="only containers whose image name matches this glob")
    s.add_argument("--spec", help="YAML/JSON file with a full subscription spec")
    s.add_argument("--rate", type=float, help="at most this many events per second")
    s.add_argument("--limit", type=int, help="end after this many events")
    s.add_argument("--timeout", type=float, default=None, help="stop after this many idle seconds")
    s.set_defaults(fn=cmd_subscribe)
    st = sub.add_parser("status", help="children, subscriptions, collection, losses")
    st.add_argument("--json", action="store_true")
    st.set_defaults(fn=cmd_status)
    sub.add_parser("subscriptions", help="list live subscriptions").set_defaults(fn=cmd_subscriptions)
    u = sub.add_parser("unsubscribe", help="end a subscription")
    u.add_argument("id")
    u.set_defaults(fn=cmd_unsubscribe)
    sub.add_parser("probes", help="kernel and user probes in use").set_defaults(fn=cmd_probes)
    r = sub.add_parser("reload", help="re-read the configuration and the rule files (root)")
    r.add_argument("--timeout", type=float, default=30.0, help="seconds to wait for the verdict")
    r.set_defaults(fn=cmd_reload)
    f = sub.add_parser("fields", help="the event field table")
    f.add_argument("category", nargs="?", choices=schema.CATEGORIES)
    f.add_argument("--markdown", action="store_true", help="the whole table as docs/events.md")
    f.set_defaults(fn=cmd_fields)
    r = sub.add_parser("record", help="events to a Parquet capture (docs/captures.md)")
    r.add_argument("--events", required=True, help="comma-separated event types, as for subscribe")
    r.add_argument("--filter", help="filter expression applied to each event type")
    r.add_argument("--image", help="only containers whose image name matches this glob")
    r.add_argument("-o", "--output", required=True, help="the capture file to write (FILE.parquet)")
    stop = r.add_mutually_exclusive_group()
    stop.add_argument("--duration", help="stop after this long (30, 30s, 5m, 1h)")
    stop.add_argument("--count", type=int, help="stop after this many events of the named types")
    r.set_defaults(fn=cmd_record)
    rp = sub.add_parser("replay", help="run the detection rules over a capture, print the alerts")
    rp.add_argument("file", help="a capture written by c8ctl record")
    rp.add_argument("--rules", action="append", help="a rule file or directory (repeatable; default: the packaged rules)")
    rp.set_defaults(fn=cmd_replay)
    ru = sub.add_parser("rules", help="detection rules: list the running ones, test files")
    rsub = ru.add_subparsers(dest="rules_command", required=True)
    rl = rsub.add_parser("list", help="the detector's rules with files, matches and alerts")
    rl.add_argument("--json", action="store_true")
    rl.set_defaults(fn=cmd_rules_list)
    rt = rsub.add_parser("test", help="check rule files without a running sensor (exit 1 on errors)")
    rt.add_argument("files", nargs="+", metavar="FILE", help="rule files, loaded in order")
    rt.add_argument("--with-defaults", action="store_true",
                    help="load the packaged default rules first (their macros and lists)")
    rt.set_defaults(fn=cmd_rules_test)
    tp = sub.add_parser("top", help="live view: rates, losses, subscriptions, children (q quits)")
    tp.add_argument("--interval", type=float, default=1.0, help="seconds between refreshes")
    tp.add_argument("--once", action="store_true", help="print one view (after one interval) and exit")
    tp.set_defaults(fn=cmd_top)
    _fleet_parser(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    client = Client(find_run_dir(args.run_dir), timeout=3.0)
    try:
        return args.fn(client, args)
    except SensorUnavailable as exc:
        print(f"c8ctl: the sensor is not running: {exc}", file=sys.stderr)
        return 1
    except SensorError as exc:
        print(f"c8ctl: {exc}", file=sys.stderr)
        return 1
    except (OSError, ValueError, yaml.YAMLError) as exc:
        print(f"c8ctl: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
