"""Small named converters for configuration values.

Each takes the raw value (from YAML or an environment string) and returns the
typed value, or raises ConvertError with the bad value quoted. The loader in
config.py adds the key and where the value came from.
"""

from __future__ import annotations

import re
from typing import Any


class ConvertError(ValueError):
    """A value a converter refuses: carries the value and the reason."""

    def __init__(self, value: Any, reason: str):
        super().__init__(f"{value!r}: {reason}")
        self.value = value
        self.reason = reason


_TRUE = {"true", "yes", "on", "1"}
_FALSE = {"false", "no", "off", "0"}


def boolean(value: Any) -> bool:
    """true/false (also yes/no, on/off, 1/0, any case) -> bool."""
    if isinstance(value, bool):
        return value
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    if isinstance(value, str):
        low = value.strip().lower()
        if low in _TRUE:
            return True
        if low in _FALSE:
            return False
    raise ConvertError(value, "must be true or false")


_SIZE = re.compile(r"^(\d+)([MG])$")
_UNITS = {"M": 1 << 20, "G": 1 << 30}


def byte_size(value: Any) -> int:
    """'512M', '1G' or 0 -> bytes (M = 2**20, G = 2**30); 0 means no limit."""
    if isinstance(value, int) and not isinstance(value, bool) and value == 0:
        return 0
    if isinstance(value, str):
        text = value.strip()
        if text == "0":
            return 0
        m = _SIZE.match(text)
        if m and int(m.group(1)) > 0:
            return int(m.group(1)) * _UNITS[m.group(2)]
    raise ConvertError(value, "must be a number followed by M or G, or 0")


def integer(value: Any, minimum: int | None = None, maximum: int | None = None) -> int:
    """An integer (YAML int or decimal string) within [minimum, maximum]."""
    if isinstance(value, bool):
        raise ConvertError(value, "must be an integer")
    if isinstance(value, int):
        n = value
    elif isinstance(value, str) and re.fullmatch(r"\s*-?\d+\s*", value):
        n = int(value)
    else:
        raise ConvertError(value, "must be an integer")
    if minimum is not None and n < minimum:
        if maximum is not None:
            raise ConvertError(value, f"must be an integer from {minimum} to {maximum}")
        raise ConvertError(value, f"must be an integer >= {minimum}")
    if maximum is not None and n > maximum:
        raise ConvertError(value, f"must be an integer from {minimum} to {maximum}")
    return n


def positive_int(value: Any) -> int:
    """An integer >= 1."""
    return integer(value, minimum=1)


def count(value: Any) -> int:
    """An integer >= 0."""
    return integer(value, minimum=0)


def percent(value: Any) -> int:
    """An integer percentage 0..100 (0 means no limit where it is a limit)."""
    try:
        return integer(value, 0, 100)
    except ConvertError:
        raise ConvertError(value, "must be an integer percentage from 0 to 100") from None


def power_of_two(value: Any) -> int:
    """A positive integer that is a power of two (ring pages)."""
    try:
        n = integer(value, minimum=1)
    except ConvertError:
        n = 0
    if n < 1 or n & (n - 1):
        raise ConvertError(value, "must be a positive power of two")
    return n


_DURATION_PART = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h)")
_SECONDS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}


def duration(value: Any) -> float:
    """'500ms', '30s', '2m', '1h', '1m30s' or '0' -> seconds (float)."""
    if isinstance(value, str):
        text = value.strip()
        if text == "0":
            return 0.0
        pos, total = 0, 0.0
        for m in _DURATION_PART.finditer(text):
            if m.start() != pos:
                break
            total += float(m.group(1)) * _SECONDS[m.group(2)]
            pos = m.end()
        else:
            if pos == len(text) and pos > 0:
                return total
    raise ConvertError(value, "must be a duration such as 500ms, 30s, 2m or 1h")


def positive_duration(value: Any) -> float:
    """A duration > 0."""
    seconds = duration(value)
    if seconds <= 0:
        raise ConvertError(value, "must be a duration greater than 0, such as 500ms, 30s, 2m")
    return seconds


_BAD_USER_CHARS = re.compile(r"[\s:/\x00-\x1f]")


def user_name(value: Any) -> str:
    """A user name: non-empty, no whitespace, ':' or '/', not starting with '-'.

    Whether the system accepts the name is left to useradd (see privileges.py).
    """
    if isinstance(value, str) and value and not value.startswith("-"):
        if not _BAD_USER_CHARS.search(value):
            return value
    raise ConvertError(value, "must be a user name (no spaces, ':' or '/', not starting with '-')")


def port(value: Any) -> int:
    """A TCP port 1..65535."""
    try:
        return integer(value, 1, 65535)
    except ConvertError:
        raise ConvertError(value, "must be a port number from 1 to 65535") from None


def host_port(value: Any) -> str | None:
    """'host:port' (host may be empty, '*' or a bracketed IPv6) or None/'' -> None."""
    if value is None or value == "":
        return None
    if isinstance(value, str) and ":" in value:
        host, _, p = value.rpartition(":")
        try:
            port(p)
        except ConvertError:
            raise ConvertError(value, "must be host:port with a port from 1 to 65535") from None
        return f"{host}:{int(p)}"
    raise ConvertError(value, "must be host:port, e.g. 0.0.0.0:8484")


def optional_path(value: Any) -> str | None:
    """A path string, or None/'' for unset."""
    if value is None or value == "":
        return None
    return path(value)


def path(value: Any) -> str:
    """A non-empty path string."""
    if isinstance(value, str) and value and "\x00" not in value:
        return value
    raise ConvertError(value, "must be a path")


def string_list(value: Any) -> list[str]:
    """A list of strings; from the environment, a YAML list '[a, b]' or 'a,b'."""
    if isinstance(value, str):
        text = value.strip()
        if text.startswith("["):
            import yaml

            try:
                value = yaml.safe_load(text)
            except yaml.YAMLError:
                raise ConvertError(value, "must be a list of paths") from None
        else:
            value = [p.strip() for p in text.split(",") if p.strip()]
    if isinstance(value, list) and all(isinstance(v, str) and v for v in value):
        return list(value)
    raise ConvertError(value, "must be a list of paths")


_LEVELS = ("debug", "info", "warning", "error", "critical")


def log_level(value: Any) -> str:
    """One of debug, info, warning, error, critical (any case)."""
    if isinstance(value, str) and value.strip().lower() in _LEVELS:
        return value.strip().lower()
    raise ConvertError(value, "must be one of " + ", ".join(_LEVELS))


_BPF_OUTPUTS = ("auto", "ringbuf", "perf")


def bpf_output(value: Any) -> str:
    """Where eBPF programs write: auto (ring buffers where the kernel has them), ringbuf, perf."""
    if isinstance(value, str) and value.strip().lower() in _BPF_OUTPUTS:
        return value.strip().lower()
    raise ConvertError(value, "must be one of " + ", ".join(_BPF_OUTPUTS))


def _output_name(value: Any) -> str:
    """An output's name: 1-64 printable characters."""
    if isinstance(value, str) and 0 < len(value) <= 64 and value.isprintable():
        return value
    raise ConvertError(value, "must be 1 to 64 printable characters")


OUTPUT_TYPES = ("stdout", "file", "webhook", "syslog")

# Keys every output may have, then the keys of each type, with their converters.
_COMMON_OUTPUT_KEYS = {
    "type": None,
    "enabled": boolean,
    "limit_per_period": positive_int,
    "limit_period": positive_duration,
    "name": _output_name,  # in logs and errors: "alerts dropped by <name>"
}
_TYPED_OUTPUT_KEYS = {
    "stdout": {},
    "file": {"path": path, "max_bytes": byte_size, "backups": count},
    "webhook": {"url": path, "timeout": positive_duration, "queue_size": positive_int,
                "retries": count, "insecure": boolean},
    "syslog": {"address": path, "protocol": None, "facility": None, "timeout": positive_duration,
               "queue_size": positive_int},
}
_REQUIRED_OUTPUT_KEYS = {"file": ("path",), "webhook": ("url",)}
_SYSLOG_PROTOCOLS = ("udp", "tcp", "unix")
_SYSLOG_FACILITIES = ("kern", "user", "mail", "daemon", "auth", "syslog", "lpr", "news",
                      "uucp", "cron", "authpriv", "ftp") + tuple(f"local{i}" for i in range(8))


def _redact_url(url: Any) -> str:
    """scheme://host:port of a webhook URL, the rest (user info, path, query) as ***:
    a URL may carry a token, and config errors are logged (the detector's
    outputs/webhook.py shows more of it, with the same care)."""
    import urllib.parse

    try:
        parts = urllib.parse.urlsplit(str(url))
        host, port = parts.hostname or "", parts.port
    except ValueError:
        return "***"
    rest = "/***" if parts.path.strip("/") or parts.query or parts.fragment else parts.path
    return (f"{parts.scheme}://" + ("***@" if "@" in parts.netloc else "") + host
            + (f":{port}" if port else "") + rest)


def _shown(out: Any) -> Any:
    """An output map as an error may show it: a webhook's url redacted."""
    if isinstance(out, dict) and "url" in out:
        return {**out, "url": _redact_url(out["url"])}
    return out


def alert_outputs(value: Any) -> list[dict[str, Any]]:
    """alert_output.outputs: a list of maps, each with a known `type`.

    Durations become seconds, sizes bytes; `enabled` defaults to true;
    `limit_per_period` and `limit_period` must come together.
    """
    if isinstance(value, str):
        import yaml

        try:
            value = yaml.safe_load(value)
        except yaml.YAMLError:
            raise ConvertError(value, "must be a list of output maps") from None
    if not isinstance(value, list):
        raise ConvertError(value, "must be a list of output maps")
    result = []
    for i, out in enumerate(value):
        where = f"outputs[{i}]"
        if not isinstance(out, dict):
            raise ConvertError(_shown(out), f"{where} must be a map with a type")
        kind = out.get("type")
        if kind not in OUTPUT_TYPES:
            raise ConvertError(kind, f"{where}.type must be one of " + ", ".join(OUTPUT_TYPES))
        allowed = {**_COMMON_OUTPUT_KEYS, **_TYPED_OUTPUT_KEYS[kind]}
        clean: dict[str, Any] = {"type": kind, "enabled": True}
        for key, raw in out.items():
            if key not in allowed:
                raise ConvertError(key, f"{where}: unknown key for a {kind} output")
            conv = allowed[key]
            if conv is None:
                continue
            try:
                clean[key] = conv(raw)
            except ConvertError as e:
                shown = _redact_url(raw) if key == "url" else raw
                raise ConvertError(shown, f"{where}.{key} {e.reason}") from None
        if kind == "syslog":
            proto = out.get("protocol", "udp")
            if proto not in _SYSLOG_PROTOCOLS:
                raise ConvertError(proto, f"{where}.protocol must be one of udp, tcp, unix")
            facility = out.get("facility", "daemon")
            if facility not in _SYSLOG_FACILITIES:
                raise ConvertError(facility, f"{where}.facility must be a syslog facility")
            clean["protocol"], clean["facility"] = proto, facility
        for key in _REQUIRED_OUTPUT_KEYS.get(kind, ()):
            if key not in clean:
                raise ConvertError(_shown(out), f"{where}: a {kind} output needs {key}")
        if kind == "webhook":
            scheme = clean["url"].partition("://")[0].lower()
            if scheme not in ("http", "https"):
                raise ConvertError(_redact_url(clean["url"]), f"{where}.url must be https://...")
            if scheme == "http" and not clean.get("insecure"):
                raise ConvertError(_redact_url(clean["url"]),
                                   f"{where}.url is plain http (alerts and any token in the URL "
                                   "in clear): use https://, or set insecure: true on this output")
        if ("limit_per_period" in clean) != ("limit_period" in clean):
            raise ConvertError(_shown(out), f"{where}: limit_per_period and limit_period go together")
        result.append(clean)
    return result
