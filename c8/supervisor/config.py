"""The sensor's configuration: one YAML file, every key also an environment variable.

Precedence: environment beats file, file beats default. The file is
/etc/capsule8/capsule8-sensor.yaml unless CAPSULE8_CONFIG (or the `path`
argument) names another; a missing default file means all defaults, a missing
named file is an error. Every key's environment variable is CAPSULE8_ plus the
key upper-cased with dots as underscores, except the documented limiter.*
keys, which are CAPSULE8_EVENT_LIMITER_*. An unknown key or a bad value raises
ConfigError naming the key, the value and where it came from.

    cfg = load()                   # Config, frozen; cfg.limiter.enabled
    child_config = cfg.as_dict()   # plain nested dict for the children
"""

from __future__ import annotations

import dataclasses
import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import yaml

from c8.supervisor import converters as cv

DEFAULT_PATH = "/etc/capsule8/capsule8-sensor.yaml"
CONFIG_ENV = "CAPSULE8_CONFIG"
ENV_PREFIX = "CAPSULE8_"
# The alert file the detector writes and the exporter follows when both run.
EXPORT_ALERTS_FILE = "alerts.jsonl"
EXPORT_ALERTS_OUTPUT = "export"
# Where the detector writes every alert, besides alert_output.outputs (detections.alerts_file).
DEFAULT_ALERTS_FILE = "/var/log/capsule8/alerts.json"
ALERTS_FILE_OUTPUT = {"type": "file", "name": "alerts_file", "max_bytes": "100M", "backups": 5}
# The package's own rules, shipped as data of c8.detections.
PACKAGE_RULES_DIR = os.path.join(
    os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "detections", "default_rules"
)


class ConfigError(Exception):
    """A configuration that stops start-up; the message names key, value and source."""


def _probe_grants(value: Any) -> tuple[str, ...]:
    """allow_probes: uids, user names and ``group:NAME`` entries that must exist."""
    import grp
    import pwd

    if isinstance(value, str):
        value = cv.string_list(value)
    if not isinstance(value, list):
        raise cv.ConvertError(value, "must be a list of uids, user names or group:NAME")
    out = []
    for v in value:
        text = str(v).strip() if isinstance(v, int | str) and not isinstance(v, bool) else ""
        try:
            if text.startswith("group:"):
                grp.getgrnam(text[6:])
            elif not text.isdigit():
                pwd.getpwnam(text)
        except KeyError:
            raise cv.ConvertError(value, f"no such {'group' if text.startswith('group:') else 'user'}: {text!r}") from None
        if not text:
            raise cv.ConvertError(value, "must be a list of uids, user names or group:NAME")
        out.append(text)
    return tuple(out)


def _nats_urls(value: Any) -> tuple[str, ...]:
    """export.nats.url: one or more nats:// (or tls://, ws://, wss://) server URLs."""
    urls = cv.string_list(value) if isinstance(value, str | list) else value
    if not isinstance(urls, list) or not urls:
        raise cv.ConvertError(value, "must be one or more nats://host:port URLs")
    for u in urls:
        if not isinstance(u, str) or not re.match(r"^(nats|tls|ws|wss)://[^\s/]+(:\d+)?/?$", u):
            raise cv.ConvertError(value, f"{u!r} is not a nats://host:port URL")
    return tuple(urls)


def _optional_text(value: Any) -> str | None:
    """A string or None/'' for unset (names, secrets: never a number by accident)."""
    if value is None or value == "":
        return None
    if isinstance(value, str):
        return value
    raise cv.ConvertError(value, "must be a string")


def _stream_name(value: Any) -> str:
    """A JetStream stream name: letters, digits, - and _ (no dots, spaces or wildcards)."""
    if isinstance(value, str) and re.fullmatch(r"[A-Za-z0-9_-]{1,64}", value):
        return value
    raise cv.ConvertError(value, "must be a stream name of letters, digits, - and _")


def _export_spec(value: Any) -> dict[str, Any]:
    """export.events: a subscription spec as c8ctl subscribe takes it (a map; from the
    environment YAML/JSON, or a comma list of event types). Filters are checked by the
    broker when the exporter subscribes."""
    if isinstance(value, str):
        text = value.strip()
        if text.startswith("{"):
            try:
                value = yaml.safe_load(text)
            except yaml.YAMLError:
                raise cv.ConvertError(value, "must be a subscription spec map") from None
        else:
            value = {"events": {t.strip(): {} for t in text.split(",") if t.strip()}}
    if value is None:
        return {}
    if not isinstance(value, dict) or not set(value) <= {"events", "containers", "modifiers"}:
        raise cv.ConvertError(value, "must be a map with events (and optional containers, "
                                     "modifiers), as c8ctl subscribe takes it")
    events = value.get("events") or {}
    if not isinstance(events, dict):
        raise cv.ConvertError(value, "events must be a map of event type to options")
    from c8 import expr, schema  # shared packages: filters checked here, not at first use

    for category, opts in events.items():
        if category not in schema.KINDS:
            raise cv.ConvertError(value, f"unknown event type {category!r} (known: "
                                         f"{', '.join(schema.CATEGORIES)})")
        if category in ("kernel_call", "user_call"):
            continue  # probe specs: the broker validates them (and who may place them)
        if opts is not None and not isinstance(opts, dict):
            raise cv.ConvertError(value, f"events.{category} must be a map (filter: ...)")
        text = (opts or {}).get("filter")
        try:
            if text:
                expr.check(expr.parse(text), category)
        except expr.ExprError as exc:
            raise cv.ConvertError(value, f"events.{category}: {exc}") from None
    return {k: (dict(v) if isinstance(v, dict) else v) for k, v in value.items()}


@dataclass(frozen=True)
class Key:
    """One configuration key: its default (raw, as a user would write it) and converter."""

    name: str
    default: Any
    convert: Callable[[Any], Any]

    @property
    def env(self) -> str:
        """The environment variable bound to this key."""
        if self.name.startswith("limiter."):
            return ENV_PREFIX + "EVENT_LIMITER_" + self.name.split(".", 1)[1].upper()
        return ENV_PREFIX + self.name.upper().replace(".", "_")


KEYS: dict[str, Key] = {
    k.name: k
    for k in (
        Key("use_supervisor", False, cv.boolean),
        Key("use_resource_limits", False, cv.boolean),
        Key("memory_limit", "1024M", cv.byte_size),
        Key("cpu_limit", 5, cv.percent),
        Key("sensor_user", "capsule8", cv.user_name),
        Key("log_cgroup_metrics", False, cv.boolean),
        Key("cgroup_metrics_interval", "2m", cv.positive_duration),
        Key("limiter.enabled", False, cv.boolean),
        Key("limiter.events_per_second", 3500, cv.positive_int),
        Key("limiter.duration", "30s", cv.positive_duration),
        Key("limiter.max_retries", 3, cv.count),
        Key("limiter.group_request_duration", "1s", cv.positive_duration),
        Key("alert_output.outputs", [{"type": "stdout", "enabled": True}], cv.alert_outputs),
        Key("run_dir", "/var/run/capsule8", cv.path),
        Key("ring_pages", 256, cv.power_of_two),
        Key("bpf_output", "auto", cv.bpf_output),  # auto: BPF ring buffers where the kernel has them
        Key("max_collectors", 8, cv.positive_int),  # collector processes; more CPUs share them
        Key("string_width", 256, cv.positive_int),
        Key("merge_holdback", "0ms", cv.duration),  # extra wait past the collectors' watermarks
        Key("subscriber_queue", 64, cv.positive_int),
        Key("pushdown", True, cv.boolean),
        Key("fd_table.max_per_process", 512, cv.positive_int),  # descriptors learnt per process
        Key("fd_table.max_entries", 65536, cv.positive_int),    # ... and in all
        Key("detections.enabled", True, cv.boolean),
        Key("detections.rules", ["/etc/capsule8/rules", PACKAGE_RULES_DIR], cv.string_list),
        Key("detections.fold_period", "1s", cv.duration),  # one alert per rule and process per period
        Key("detections.alerts_file", DEFAULT_ALERTS_FILE, cv.optional_path),  # "": none
        Key("listen_tcp", None, cv.host_port),
        Key("curve_server_secret_key_file", None, cv.optional_path),
        Key("curve_authorized_keys_dir", None, cv.optional_path),
        Key("curve_admin_keys_dir", None, cv.optional_path),
        Key("allow_probes", [], _probe_grants),
        Key("limits.filter_bytes", 65536, cv.positive_int),
        Key("limits.filter_terms", 1000, cv.positive_int),
        Key("limits.number_digits", 32, cv.positive_int),
        Key("limits.subscriptions_per_peer", 16, cv.positive_int),
        Key("limits.subscriptions", 256, cv.positive_int),
        Key("limits.probes", 64, cv.positive_int),
        Key("sensor_id_file", "/var/lib/capsule8/sensor_id", cv.path),
        Key("log_level", "info", cv.log_level),
        Key("heartbeat_timeout", "30s", cv.duration),  # > cpu0's eBPF detach (4 s measured); 0: off
        Key("metrics.listen", None, cv.host_port),  # Prometheus /metrics and /healthz; off when unset
        Key("export.enabled", False, cv.boolean),
        Key("export.nats.url", ["nats://127.0.0.1:4222"], _nats_urls),
        Key("export.nats.user", None, _optional_text),
        Key("export.nats.password", None, _optional_text),
        Key("export.nats.token", None, _optional_text),
        Key("export.nats.creds_file", None, cv.optional_path),
        Key("export.nats.nkeys_seed_file", None, cv.optional_path),
        Key("export.nats.tls_ca_file", None, cv.optional_path),
        Key("export.nats.tls_cert_file", None, cv.optional_path),
        Key("export.nats.tls_key_file", None, cv.optional_path),
        Key("export.nats.tls_hostname", None, _optional_text),
        Key("export.nats.stream", "C8", _stream_name),
        Key("export.nats.replicas", 1, cv.positive_int),
        Key("export.nats.max_age", "168h", cv.duration),   # 0: no age limit
        Key("export.nats.max_bytes", "1G", cv.byte_size),  # 0: no size limit
        Key("export.nats.duplicate_window", "2m", cv.positive_duration),
        Key("export.events", {}, _export_spec),
        Key("export.spool_dir", "/var/lib/capsule8/export", cv.path),
        Key("export.spool_bytes", "256M", cv.byte_size),
    )
}
ENV_TO_KEY = {k.env: k.name for k in KEYS.values()}
# Every dotted prefix of a key is a section (export, export.nats).
_SECTIONS = {name.rsplit(".", i)[0] for name in KEYS for i in range(1, name.count(".") + 1)}


@dataclass(frozen=True)
class LimiterConfig:
    """limiter.*: the event limiter (circuit breaker) applied by the broker."""

    enabled: bool
    events_per_second: int
    duration: float
    max_retries: int
    group_request_duration: float


@dataclass(frozen=True)
class AlertOutputConfig:
    """alert_output.*: where the detector sends alerts, each output with its limiter."""

    outputs: tuple[dict[str, Any], ...]


@dataclass(frozen=True)
class DetectionsConfig:
    """detections.*: whether the detector runs, and its rule files or directories."""

    enabled: bool
    rules: tuple[str, ...]
    fold_period: float = 1.0
    alerts_file: str | None = DEFAULT_ALERTS_FILE


@dataclass(frozen=True)
class LimitsConfig:
    """limits.*: bounds on what one client's requests may cost the broker (docs/security.md)."""

    filter_bytes: int
    filter_terms: int
    number_digits: int
    subscriptions_per_peer: int
    subscriptions: int
    probes: int


@dataclass(frozen=True)
class NatsConfig:
    """export.nats.*: the JetStream servers, credentials (as nats-py takes them) and stream."""

    url: tuple[str, ...] = ("nats://127.0.0.1:4222",)
    user: str | None = None
    password: str | None = None
    token: str | None = None
    creds_file: str | None = None
    nkeys_seed_file: str | None = None
    tls_ca_file: str | None = None
    tls_cert_file: str | None = None
    tls_key_file: str | None = None
    tls_hostname: str | None = None
    stream: str = "C8"
    replicas: int = 1
    max_age: float = 7 * 86400.0
    max_bytes: int = 1 << 30
    duplicate_window: float = 120.0


@dataclass(frozen=True)
class ExportConfig:
    """export.*: whether the exporter runs, where it sends (NATS JetStream), what
    (a subscription spec; alerts whenever detections run) and its on-disk spool."""

    enabled: bool = False
    nats: NatsConfig = field(default_factory=NatsConfig)
    events: dict[str, Any] = field(default_factory=dict)
    spool_dir: str = "/var/lib/capsule8/export"
    spool_bytes: int = 256 << 20


@dataclass(frozen=True)
class MetricsConfig:
    """metrics.*: where the supervisor serves /metrics and /healthz (None: nowhere)."""

    listen: str | None = None


@dataclass(frozen=True)
class FdTableConfig:
    """fd_table.*: the broker's table of descriptors and cwds learnt from the event
    stream, which resolves relative and fd-only file names (docs/events.md)."""

    max_per_process: int = 512
    max_entries: int = 65536


@dataclass(frozen=True)
class Config:
    """The validated configuration. Durations are seconds, sizes bytes."""

    use_supervisor: bool
    use_resource_limits: bool
    memory_limit: int
    cpu_limit: int
    sensor_user: str
    log_cgroup_metrics: bool
    cgroup_metrics_interval: float
    limiter: LimiterConfig
    alert_output: AlertOutputConfig
    run_dir: str
    ring_pages: int
    bpf_output: str
    max_collectors: int
    string_width: int
    merge_holdback: float
    subscriber_queue: int
    pushdown: bool
    detections: DetectionsConfig
    listen_tcp: str | None
    curve_server_secret_key_file: str | None
    curve_authorized_keys_dir: str | None
    curve_admin_keys_dir: str | None
    allow_probes: tuple[str, ...]
    limits: LimitsConfig
    sensor_id_file: str
    log_level: str
    heartbeat_timeout: float
    # The file the values came from (None: defaults and environment only).
    config_path: str | None = field(default=None, compare=False)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    export: ExportConfig = field(default_factory=ExportConfig)
    fd_table: FdTableConfig = field(default_factory=FdTableConfig)

    def as_dict(self) -> dict[str, Any]:
        """A plain nested dict (lists, not tuples) safe to hand to a child."""

        def plain(v: Any) -> Any:
            if isinstance(v, tuple | list):
                return [plain(x) for x in v]
            if isinstance(v, dict):
                return {k: plain(x) for k, x in v.items()}
            return v

        d = plain(dataclasses.asdict(self))
        if self.alerts_file_output:
            # detections.alerts_file: one more file output of the detector (rotated)
            d["alert_output"]["outputs"] += cv.alert_outputs([self.alerts_file_output])
        if self.export.enabled and self.detections.enabled:
            # The detector's hook for the exporter: one more file output, which the
            # exporter follows (docs/export.md). No NATS code runs in the detector.
            d["alert_output"]["outputs"] += cv.alert_outputs(
                [{"type": "file", "name": EXPORT_ALERTS_OUTPUT, "max_bytes": "16M", "backups": 1,
                  "path": self.export_alerts_path}])
        return d

    @property
    def alerts_file_output(self) -> dict[str, Any] | None:
        """The file output of detections.alerts_file (100M, 5 backups); None when detections
        are off, the key is empty, or an alert_output file output already writes it."""
        det = self.detections
        if not det.enabled or not det.alerts_file or any(
                o.get("type") == "file" and o.get("path") == det.alerts_file
                for o in self.alert_output.outputs):
            return None
        return {**ALERTS_FILE_OUTPUT, "path": det.alerts_file}

    @property
    def export_alerts_path(self) -> str:
        """The alert file the detector writes for the exporter (export and detections on)."""
        return os.path.join(self.export.spool_dir, EXPORT_ALERTS_FILE)

    def get(self, dotted: str) -> Any:
        """A value by its dotted key name, e.g. get("limiter.enabled")."""
        value: Any = self
        for part in dotted.split("."):
            value = getattr(value, part)
        return value

    @property
    def resource_limits_active(self) -> bool:
        """Cgroups are made only when both use_supervisor and use_resource_limits are on."""
        return self.use_supervisor and self.use_resource_limits


def _flatten(data: Mapping[str, Any], source: str, prefix: str = "") -> dict[str, Any]:
    """YAML maps -> {dotted key: raw value}; unknown keys raise ConfigError."""
    flat: dict[str, Any] = {}
    for k, v in data.items():
        name = f"{prefix}{k}"
        if name in KEYS:
            flat[name] = v
        elif name in _SECTIONS and isinstance(v, dict):
            flat.update(_flatten(v, source, prefix=f"{name}."))
        else:
            raise ConfigError(f"{name}: unknown key in {source}")
    return flat


def read_file(path: str) -> dict[str, Any]:
    """The raw flat values of one YAML file."""
    try:
        with open(path, encoding="utf-8") as f:
            data = yaml.safe_load(f)
    except OSError as e:
        raise ConfigError(f"cannot read configuration file {path}: {e.strerror}") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a map of keys to values")
    return _flatten(data, path)


def read_environ(environ: Mapping[str, str]) -> dict[str, tuple[str, str]]:
    """{key: (raw value, env var name)} from CAPSULE8_* variables; unknown names raise."""
    found = {}
    for name, value in environ.items():
        if not name.startswith(ENV_PREFIX) or name == CONFIG_ENV:
            continue
        key = ENV_TO_KEY.get(name)
        if key is None:
            raise ConfigError(f"{name}: unknown key from the environment "
                              "(no configuration key maps to it)")
        found[key] = (value, name)
    return found


def _convert(key: Key, raw: Any, source: str) -> Any:
    try:
        return key.convert(raw)
    except cv.ConvertError as e:
        raise ConfigError(f"{key.name}: {e.value!r} from {source}: {e.reason}") from None


def child_config(**overrides: Any) -> dict[str, Any]:
    """The map a child receives (``Config.as_dict``) for the defaults, with top-level
    keys replaced (nested maps merged): for building a child in a test or a bench.
    Children read every key from this map, never a default of their own."""
    out = load(None, {}).as_dict()
    for key, value in overrides.items():
        if key not in out:
            raise ConfigError(f"{key}: unknown key")
        out[key] = {**out[key], **value} if isinstance(out[key], dict) and isinstance(value, dict) else value
    return out


def load(path: str | None = None, environ: Mapping[str, str] | None = None) -> Config:
    """Load and validate the configuration (see the module docstring for precedence)."""
    env = os.environ if environ is None else environ
    explicit = path or env.get(CONFIG_ENV) or None
    file_path = explicit or DEFAULT_PATH
    raw: dict[str, tuple[Any, str]] = {n: (k.default, "default") for n, k in KEYS.items()}
    used_path = None
    if explicit is not None or os.path.exists(file_path):
        if explicit is not None and not os.path.exists(file_path):
            raise ConfigError(f"configuration file {file_path} does not exist")
        raw.update({k: (v, file_path) for k, v in read_file(file_path).items()})
        used_path = file_path
    raw.update(read_environ(env))
    values = {n: _convert(KEYS[n], v, src) for n, (v, src) in raw.items()}

    if values["listen_tcp"] is not None:
        for need in ("curve_server_secret_key_file", "curve_authorized_keys_dir"):
            if values[need] is None:
                v, src = raw["listen_tcp"]
                raise ConfigError(f"listen_tcp: {v!r} from {src}: needs {need} "
                                  "(remote clients must use ZeroMQ CURVE)")

    def section(cls: type, prefix: str) -> Any:
        kwargs = {f.name: values[f"{prefix}.{f.name}"] for f in dataclasses.fields(cls)}
        for k, v in kwargs.items():
            if isinstance(v, list):
                kwargs[k] = tuple(v)
        return cls(**kwargs)

    if values["export.spool_bytes"] < 1 << 20:
        v, src = raw["export.spool_bytes"]
        raise ConfigError(f"export.spool_bytes: {v!r} from {src}: must be at least 1M")
    top = {n: v for n, v in values.items() if "." not in n}
    return Config(
        **top,
        limiter=section(LimiterConfig, "limiter"),
        alert_output=section(AlertOutputConfig, "alert_output"),
        detections=section(DetectionsConfig, "detections"),
        limits=section(LimitsConfig, "limits"),
        config_path=used_path,
        metrics=section(MetricsConfig, "metrics"),
        fd_table=section(FdTableConfig, "fd_table"),
        export=ExportConfig(enabled=values["export.enabled"], nats=section(NatsConfig, "export.nats"),
                            events=values["export.events"], spool_dir=values["export.spool_dir"],
                            spool_bytes=values["export.spool_bytes"]),
    )
