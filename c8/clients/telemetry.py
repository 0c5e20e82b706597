"""c8-telemetry: the example client of Capsule8's demonstration.

Subscribes to process lifecycle (fork, exec, exit), open(2) return values,
file opens matching ``*foo*``, connect calls with the IPv4 address and port
(kernel-call probes on tcp_connect's caller where the kernel has kprobes, the
network events elsewhere) and container lifecycle; prints one event a line.

    c8-telemetry [-image GLOB] [-json]
"""

from __future__ import annotations

import argparse
import json
import sys

from c8.clients.c8ctl import find_run_dir
from c8.clients.client import Client, SensorError, SensorUnavailable

OPEN_SYSCALLS = (2, 85, 257, 437)  # open, creat, openat, openat2

SKIP = {"sensor_id", "container", "uid", "gid", "euid", "egid", "suid", "sgid", "fsuid", "fsgid"}


def spec(image: str | None, use_kprobes: bool) -> dict:
    events: dict = {
        "process": {},
        "syscall": {"kinds": ["EXIT"], "filter": "id in (" + ", ".join(map(str, OPEN_SYSCALLS)) + ")"},
        "file": {"filter": 'kind == "OPEN" and filename like "*foo*"'},
        "container": {},
    }
    if use_kprobes:
        events["kernel_call"] = [{"symbol": "__sys_connect", "fetchargs":
                                  "family=+0($arg2):u16 port=+2($arg2):u16 address=+4($arg2):u32"}]
    else:
        events["network"] = {"filter": 'kind == "CONNECT_ATTEMPT" and family == 2'}
    s: dict = {"events": events}
    if image:
        s["containers"] = {"image": image}
    return s


def line(ev: dict) -> str:
    """Capsule8-style one-line rendering: common fields, then the payload.

    Syscall dicts keep ``id`` for the syscall number and the event id in
    ``event_id``: the head shows the event id, the payload the number.
    """
    ev = dict(ev)
    event_id = ev.pop("event_id", None)
    if ev.get("type") == "syscall" and event_id is not None:
        ev["syscall_id"] = ev["id"]
        ev["id"] = event_id
    common = ("id", "process_id", "process_pid", "process_tid", "container_id", "container_name",
              "image_id", "image_name", "sensor_sequence_number", "sensor_monotime_nanos", "cpu")
    # strings JSON-quoted: a command line with newlines or quotes stays on one line
    head = " ".join(f"{k}:{json.dumps(ev[k])}" if isinstance(ev[k], str) else f"{k}:{ev[k]}"
                    for k in common if ev.get(k) not in ("", None, 0) or k == "cpu")
    payload = " ".join(f"{k}:{json.dumps(v)}" if isinstance(v, str) else f"{k}:{v}"
                       for k, v in ev.items() if k not in common and k not in SKIP and k != "type"
                       and v not in ("", None))
    return f"event:<{head} {ev['type']}:<{payload}> >"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="c8-telemetry", description=__doc__.split("\n\n")[0])
    p.add_argument("-image", "--image", help="only containers whose image name matches this glob")
    p.add_argument("-json", "--json", action="store_true", help="print JSON lines")
    p.add_argument("-run-dir", "--run-dir", help="the sensor's run_dir")
    p.add_argument("-timeout", "--timeout", type=float, help="stop after this many idle seconds")
    args = p.parse_args(argv)
    client = Client(find_run_dir(args.run_dir))
    if args.image:
        print(f"Watching for container images matching {args.image}", file=sys.stderr)
    try:
        try:
            sub = client.subscribe(spec(args.image, use_kprobes=True))
        except SensorError as exc:
            if "kprobe" not in str(exc).lower():
                raise
            sub = client.subscribe(spec(args.image, use_kprobes=False))
        with sub:
            for ev in sub.events(idle=args.timeout):
                print(json.dumps(ev, default=str) if args.json else line(ev), flush=True)
    except KeyboardInterrupt:
        return 0
    except (SensorError, SensorUnavailable) as exc:
        print(f"c8-telemetry: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
