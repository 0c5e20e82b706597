"""Outputs from the config's ``alert_output.outputs`` list.

Each entry is a map: ``type`` (stdout, file, webhook, syslog), ``enabled``
(default true), ``limit_per_period`` and ``limit_period`` (the alert limiter;
default no limit), and the type's own keys:
file: path, max_bytes, backups; webhook: url, insecure, timeout, queue_size,
retries; syslog: address, protocol, facility, app_name, timeout, queue_size.
Unknown keys are errors. Webhook and syslog deliver from their own thread
behind a bounded queue (outputs/queued.py). An error names the entry (index,
type and name) and the key, and never shows a webhook URL's secrets.
"""

from __future__ import annotations

from c8.detections.limiter import AlertLimiter, parse_duration
from c8.detections.outputs.file import FileOutput
from c8.detections.outputs.stdout import StdoutOutput
from c8.detections.outputs.syslog import SyslogOutput
from c8.detections.outputs.webhook import WebhookOutput

COMMON_KEYS = {"type", "enabled", "limit_per_period", "limit_period", "name"}
TYPES = {
    "stdout": (StdoutOutput, set()),
    "file": (FileOutput, {"path", "max_bytes", "backups"}),
    "webhook": (WebhookOutput, {"url", "timeout", "queue_size", "retries", "backoff", "headers",
                                "insecure"}),
    "syslog": (SyslogOutput, {"address", "protocol", "facility", "app_name", "timeout", "queue_size"}),
}
REQUIRED = {"file": {"path"}, "webhook": {"url"}}


class OutputConfigError(ValueError):
    """A bad alert_output entry; the message names the entry and the key."""


def _byte_size(value) -> int:
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    text = str(value).strip().upper()
    for suffix, mult in (("K", 1 << 10), ("M", 1 << 20), ("G", 1 << 30)):
        if text.endswith(suffix) or text.endswith(suffix + "B"):
            return int(float(text.rstrip("B")[:-1]) * mult)
    return int(text)


def build_output(entry: dict, index: int = 0) -> AlertLimiter | None:
    """One limiter-wrapped output, or None when the entry is disabled."""
    where = f"alert_output.outputs[{index}]"
    if not isinstance(entry, dict):
        raise OutputConfigError(f"{where}: must be a map, got {entry!r}")
    kind = entry.get("type")
    if kind not in TYPES:
        raise OutputConfigError(f"{where}: type {kind!r} is not one of {', '.join(TYPES)}")
    cls, keys = TYPES[kind]
    if entry.get("name"):
        where += f" {entry['name']!r}"
    unknown = set(entry) - COMMON_KEYS - keys
    if unknown:
        raise OutputConfigError(f"{where} ({kind}): unknown key(s) {', '.join(sorted(unknown))}; "
                                f"known: {', '.join(sorted(COMMON_KEYS | keys))}")
    missing = REQUIRED.get(kind, set()) - set(entry)
    if missing:
        raise OutputConfigError(f"{where} ({kind}): missing {', '.join(sorted(missing))}")
    if not entry.get("enabled", True):
        return None
    kwargs = {k: entry[k] for k in keys if k in entry}
    try:
        if "max_bytes" in kwargs:
            kwargs["max_bytes"] = _byte_size(kwargs["max_bytes"])
        if "timeout" in kwargs:
            kwargs["timeout"] = parse_duration(kwargs["timeout"])
        if "backoff" in kwargs:
            kwargs["backoff_s"] = parse_duration(kwargs.pop("backoff"))
        if "insecure" in kwargs and not isinstance(kwargs["insecure"], bool):
            raise ValueError(f"insecure must be true or false, got {kwargs['insecure']!r}")
        output = cls(name=entry.get("name") or kind, **kwargs)
        return AlertLimiter(output, entry.get("limit_per_period"), entry.get("limit_period"))
    except (ValueError, TypeError, OSError) as exc:
        raise OutputConfigError(f"{where} ({kind}): {exc}") from None


def build_outputs(config: dict) -> list[AlertLimiter]:
    """Every enabled output of ``config["alert_output"]["outputs"]`` (stdout if none given)."""
    entries = ((config.get("alert_output") or {}).get("outputs"))
    if entries is None:
        entries = [{"type": "stdout"}]
    if not isinstance(entries, list):
        raise OutputConfigError(f"alert_output.outputs must be a list, got {entries!r}")
    built = [build_output(e, i) for i, e in enumerate(entries)]
    return [o for o in built if o is not None]
