"""Configuration: converters, precedence, error messages, unknown keys."""

import os

import pytest

from c8.supervisor import config
from c8.supervisor import converters as cv
from c8.supervisor.config import ConfigError, load

MISSING = "/nonexistent/c8-test/capsule8-sensor.yaml"


def write(tmp_path, text):
    p = tmp_path / "capsule8-sensor.yaml"
    p.write_text(text)
    return str(p)


@pytest.fixture(autouse=True)
def no_default_file(monkeypatch):
    # The host may have a real /etc/capsule8 file; unit tests never read it.
    monkeypatch.setattr(config, "DEFAULT_PATH", MISSING)


# -- converters

@pytest.mark.parametrize("raw,want", [
    (True, True), (False, False), ("true", True), ("FALSE", False), ("yes", True),
    ("off", False), ("1", True), ("0", False), (1, True), (0, False)])
def test_boolean(raw, want):
    assert cv.boolean(raw) is want


@pytest.mark.parametrize("raw", ["maybe", "", 2, None, "truee"])
def test_boolean_rejects(raw):
    with pytest.raises(cv.ConvertError, match="must be true or false") as e:
        cv.boolean(raw)
    assert repr(raw) in str(e.value)


@pytest.mark.parametrize("raw,want", [
    ("512M", 512 << 20), ("1G", 1 << 30), ("1024M", 1 << 30), ("0", 0), (0, 0)])
def test_byte_size(raw, want):
    assert cv.byte_size(raw) == want


@pytest.mark.parametrize("raw", ["12X", "512", "1.5G", "M", "-1M", "0M", 512, "512MB", None])
def test_byte_size_rejects(raw):
    with pytest.raises(cv.ConvertError, match=r"must be a number followed by M or G, or 0"):
        cv.byte_size(raw)


@pytest.mark.parametrize("raw,want", [(0, 0), (5, 5), (100, 100), ("20", 20)])
def test_percent(raw, want):
    assert cv.percent(raw) == want


@pytest.mark.parametrize("raw", [-1, 250, 101, "five", True, 5.5])
def test_percent_rejects(raw):
    with pytest.raises(cv.ConvertError, match="from 0 to 100") as e:
        cv.percent(raw)
    assert str(e.value).startswith(repr(raw))


@pytest.mark.parametrize("raw,want", [
    ("500ms", 0.5), ("30s", 30.0), ("2m", 120.0), ("1h", 3600.0), ("1m30s", 90.0),
    ("0", 0.0), ("1.5s", 1.5)])
def test_duration(raw, want):
    assert cv.duration(raw) == pytest.approx(want)


@pytest.mark.parametrize("raw", ["30", 30, "s", "5d", "1m 30s", "", "ms30", "-1s", None])
def test_duration_rejects(raw):
    with pytest.raises(cv.ConvertError, match="must be a duration"):
        cv.duration(raw)


def test_positive_duration_rejects_zero():
    with pytest.raises(cv.ConvertError, match="greater than 0"):
        cv.positive_duration("0")


@pytest.mark.parametrize("raw", ["capsule8", "root", "svc-c8", "a.b"])
def test_user_name(raw):
    assert cv.user_name(raw) == raw


@pytest.mark.parametrize("raw", ["", "two words", "a:b", "a/b", "-x", 5, None])
def test_user_name_rejects(raw):
    with pytest.raises(cv.ConvertError, match="must be a user name"):
        cv.user_name(raw)


def test_port():
    assert cv.port("8484") == 8484
    for bad in (0, 65536, "http", -3):
        with pytest.raises(cv.ConvertError, match="port number from 1 to 65535"):
            cv.port(bad)


def test_host_port():
    assert cv.host_port("0.0.0.0:8484") == "0.0.0.0:8484"
    assert cv.host_port("[::1]:99") == "[::1]:99"
    assert cv.host_port(None) is None
    with pytest.raises(cv.ConvertError, match="host:port"):
        cv.host_port("localhost")
    with pytest.raises(cv.ConvertError, match="port from 1 to 65535"):
        cv.host_port("localhost:99999")


def test_power_of_two():
    assert cv.power_of_two(256) == 256
    assert cv.power_of_two("1") == 1
    for bad in (0, 3, 100, -4, "x"):
        with pytest.raises(cv.ConvertError, match="power of two"):
            cv.power_of_two(bad)


def test_string_list():
    assert cv.string_list(["/a", "/b"]) == ["/a", "/b"]
    assert cv.string_list("/a,/b") == ["/a", "/b"]
    assert cv.string_list("[/a, /b]") == ["/a", "/b"]
    with pytest.raises(cv.ConvertError, match="list of paths"):
        cv.string_list([1, 2])


def test_log_level():
    assert cv.log_level("DEBUG") == "debug"
    with pytest.raises(cv.ConvertError, match="one of debug"):
        cv.log_level("loud")


def test_alert_outputs_normalises():
    outs = cv.alert_outputs([
        {"type": "stdout", "limit_per_period": 5, "limit_period": "60s"},
        {"type": "file", "path": "/tmp/a.log", "max_bytes": "10M", "backups": 3,
         "enabled": False},
        {"type": "webhook", "url": "http://127.0.0.1:9/x", "timeout": "5s", "queue_size": 10,
         "retries": 2, "insecure": True},
        {"type": "syslog", "address": "/dev/log", "protocol": "unix", "facility": "local3"},
    ])
    assert outs[0] == {"type": "stdout", "enabled": True, "limit_per_period": 5,
                       "limit_period": 60.0}
    assert outs[1]["max_bytes"] == 10 << 20 and outs[1]["enabled"] is False
    assert outs[2]["timeout"] == 5.0
    assert outs[3]["facility"] == "local3"


@pytest.mark.parametrize("outs,msg", [
    ([{"type": "kafka"}], r"outputs\[0\].type must be one of stdout, file, webhook, syslog"),
    ([{"type": "stdout", "limit_per_period": 5}], "limit_per_period and limit_period go together"),
    ([{"type": "stdout", "limit_period": "1m"}], "limit_per_period and limit_period go together"),
    ([{"type": "stdout", "limit_period": "1x", "limit_per_period": 1}], r"limit_period must be"),
    ([{"type": "file"}], "a file output needs path"),
    ([{"type": "webhook"}], "a webhook output needs url"),
    ([{"type": "stdout", "path": "/x"}], "unknown key for a stdout output"),
    ([{"type": "syslog", "protocol": "sctp"}], "protocol must be one of"),
    ({"type": "stdout"}, "must be a list of output maps"),
])
def test_alert_outputs_rejects(outs, msg):
    with pytest.raises(cv.ConvertError, match=msg):
        cv.alert_outputs(outs)


# -- loader

def test_defaults_match_the_reference():
    c = load(environ={})
    assert c.config_path is None
    assert (c.use_supervisor, c.use_resource_limits) == (False, False)
    assert c.memory_limit == 1024 << 20
    assert c.cpu_limit == 5
    assert c.sensor_user == "capsule8"
    assert c.log_cgroup_metrics is False
    assert c.cgroup_metrics_interval == 120.0
    assert c.limiter.enabled is False
    assert c.limiter.events_per_second == 3500
    assert c.limiter.duration == 30.0
    assert c.limiter.max_retries == 3
    assert c.limiter.group_request_duration == 1.0
    assert c.run_dir == "/var/run/capsule8"
    assert c.ring_pages == 256 and c.string_width == 256 and c.subscriber_queue == 64
    assert c.merge_holdback == 0
    assert c.detections.enabled is True   # detections on by default (issue 13 item 5)
    assert c.detections.alerts_file == "/var/log/capsule8/alerts.json"
    assert c.detections.rules[0] == "/etc/capsule8/rules"
    assert c.detections.rules[1] == config.PACKAGE_RULES_DIR
    assert c.listen_tcp is None
    assert c.sensor_id_file == "/var/lib/capsule8/sensor_id"


def test_env_names_follow_the_reference():
    env = {k.name: k.env for k in config.KEYS.values()}
    assert env["use_supervisor"] == "CAPSULE8_USE_SUPERVISOR"
    assert env["use_resource_limits"] == "CAPSULE8_USE_RESOURCE_LIMITS"
    assert env["memory_limit"] == "CAPSULE8_MEMORY_LIMIT"
    assert env["cpu_limit"] == "CAPSULE8_CPU_LIMIT"
    assert env["sensor_user"] == "CAPSULE8_SENSOR_USER"
    assert env["log_cgroup_metrics"] == "CAPSULE8_LOG_CGROUP_METRICS"
    assert env["limiter.enabled"] == "CAPSULE8_EVENT_LIMITER_ENABLED"
    assert env["limiter.events_per_second"] == "CAPSULE8_EVENT_LIMITER_EVENTS_PER_SECOND"
    assert env["limiter.duration"] == "CAPSULE8_EVENT_LIMITER_DURATION"
    assert env["limiter.max_retries"] == "CAPSULE8_EVENT_LIMITER_MAX_RETRIES"
    assert env["limiter.group_request_duration"] == \
        "CAPSULE8_EVENT_LIMITER_GROUP_REQUEST_DURATION"
    assert env["detections.enabled"] == "CAPSULE8_DETECTIONS_ENABLED"
    assert env["run_dir"] == "CAPSULE8_RUN_DIR"


def test_env_beats_file_beats_default(tmp_path):
    path = write(tmp_path, "cpu_limit: 10\nmemory_limit: 512M\nlimiter:\n  enabled: true\n")
    c = load(path, environ={"CAPSULE8_CPU_LIMIT": "20"})
    assert c.cpu_limit == 20            # environment
    assert c.memory_limit == 512 << 20  # file
    assert c.limiter.enabled is True    # file, nested section
    assert c.sensor_user == "capsule8"  # default
    assert c.config_path == path
    c = load(path, environ={"CAPSULE8_EVENT_LIMITER_ENABLED": "false"})
    assert c.limiter.enabled is False


def test_config_env_names_the_file(tmp_path):
    path = write(tmp_path, "sensor_user: root\n")
    assert load(environ={"CAPSULE8_CONFIG": path}).sensor_user == "root"


def test_dotted_keys_in_file(tmp_path):
    path = write(tmp_path, "limiter.max_retries: 9\n")
    assert load(path, environ={}).limiter.max_retries == 9


def test_memory_limit_error_names_key_value_and_file(tmp_path):
    path = write(tmp_path, "memory_limit: 12X\n")
    with pytest.raises(ConfigError) as e:
        load(path, environ={})
    assert str(e.value) == (f"memory_limit: '12X' from {path}: "
                            "must be a number followed by M or G, or 0")


@pytest.mark.parametrize("value", ["-1", "250"])
def test_cpu_limit_out_of_range_from_env(value):
    with pytest.raises(ConfigError) as e:
        load(environ={"CAPSULE8_CPU_LIMIT": value})
    assert str(e.value) == (f"cpu_limit: '{value}' from CAPSULE8_CPU_LIMIT: "
                            "must be an integer percentage from 0 to 100")


@pytest.mark.parametrize("value", [-1, 250])
def test_cpu_limit_out_of_range_from_file(tmp_path, value):
    path = write(tmp_path, f"cpu_limit: {value}\n")
    with pytest.raises(ConfigError, match=rf"^cpu_limit: {value} from {path}: .*0 to 100"):
        load(path, environ={})


def test_unknown_key_in_file(tmp_path):
    path = write(tmp_path, "cpu_limt: 5\n")
    with pytest.raises(ConfigError, match=rf"^cpu_limt: unknown key in {path}$"):
        load(path, environ={})


def test_unknown_key_in_file_section(tmp_path):
    path = write(tmp_path, "limiter:\n  enabld: true\n")
    with pytest.raises(ConfigError, match=r"^limiter.enabld: unknown key"):
        load(path, environ={})


def test_unknown_key_in_env():
    with pytest.raises(ConfigError, match=r"^CAPSULE8_CPU_LIMT: unknown key from the environment"):
        load(environ={"CAPSULE8_CPU_LIMT": "5"})


def test_limiter_env_only_by_documented_name():
    with pytest.raises(ConfigError, match="CAPSULE8_LIMITER_ENABLED: unknown key"):
        load(environ={"CAPSULE8_LIMITER_ENABLED": "true"})


def test_unrelated_env_is_ignored():
    c = load(environ={"HOME": "/root", "CAPSULE8_CONFIG": "", "C8_OTHER": "x"})
    assert c.cpu_limit == 5


def test_missing_explicit_file_is_an_error():
    with pytest.raises(ConfigError, match="does not exist"):
        load(MISSING, environ={})
    with pytest.raises(ConfigError, match="does not exist"):
        load(environ={"CAPSULE8_CONFIG": MISSING})


def test_bad_yaml_and_non_map(tmp_path):
    with pytest.raises(ConfigError, match="not valid YAML"):
        load(write(tmp_path, "a: [\n"), environ={})
    with pytest.raises(ConfigError, match="top level must be a map"):
        load(write(tmp_path, "- a\n"), environ={})


def test_empty_file_means_defaults(tmp_path):
    assert load(write(tmp_path, ""), environ={}).cpu_limit == 5


def test_alert_outputs_error_carries_key_and_file(tmp_path):
    path = write(tmp_path, "alert_output:\n  outputs:\n    - type: stdout\n"
                           "      limit_per_period: 5\n")
    with pytest.raises(ConfigError, match=rf"^alert_output.outputs: .* from {path}: "
                                          r"outputs\[0\]: limit_per_period and limit_period"):
        load(path, environ={})


def test_reference_alert_example(tmp_path):
    path = write(tmp_path, "alert_output:\n  outputs:\n  - type: stdout\n    enabled: true\n"
                           "    limit_per_period: 5\n    limit_period: '60s'\n")
    c = load(path, environ={})
    assert c.alert_output.outputs == ({"type": "stdout", "enabled": True,
                                       "limit_per_period": 5, "limit_period": 60.0},)


def test_listen_tcp_needs_curve_keys(tmp_path):
    with pytest.raises(ConfigError, match=r"^listen_tcp: '0.0.0.0:8484' from CAPSULE8_LISTEN_TCP: "
                                          "needs curve_server_secret_key_file"):
        load(environ={"CAPSULE8_LISTEN_TCP": "0.0.0.0:8484"})
    c = load(environ={"CAPSULE8_LISTEN_TCP": "0.0.0.0:8484",
                      "CAPSULE8_CURVE_SERVER_SECRET_KEY_FILE": "/k/server.key_secret",
                      "CAPSULE8_CURVE_AUTHORIZED_KEYS_DIR": "/k/authorized"})
    assert c.listen_tcp == "0.0.0.0:8484"


def test_detections_rules_from_env():
    c = load(environ={"CAPSULE8_DETECTIONS_RULES": "/r1,/r2", "CAPSULE8_DETECTIONS_ENABLED": "1"})
    assert c.detections.rules == ("/r1", "/r2") and c.detections.enabled


def test_every_key_loads_from_its_env_name():
    samples = {"memory_limit": "2G", "cpu_limit": "7", "sensor_user": "x",
               "cgroup_metrics_interval": "5s", "limiter.events_per_second": "10",
               "limiter.duration": "10s", "limiter.max_retries": "6",
               "limiter.group_request_duration": "2s", "alert_output.outputs": "[{type: stdout}]",
               "run_dir": "/tmp/r", "ring_pages": "64", "max_collectors": "4", "string_width": "128",
               "bpf_output": "Perf",
               "merge_holdback": "10ms", "subscriber_queue": "8", "detections.rules": "/r",
               "detections.fold_period": "2s",
               "listen_tcp": "", "curve_server_secret_key_file": "/k",
               "curve_authorized_keys_dir": "/d", "sensor_id_file": "/s", "log_level": "debug",
               "curve_admin_keys_dir": "/a", "allow_probes": "0,group:root",
               "heartbeat_timeout": "3s", "metrics.listen": "127.0.0.1:9464",
               "export.nats.url": "nats://h:4222", "export.nats.max_age": "1h",
               "export.nats.max_bytes": "1M", "export.nats.duplicate_window": "1m",
               "export.spool_bytes": "2M", "export.events": "process", "export.nats.replicas": "3",
               **{n: "7" for n in config.KEYS if n.startswith(("limits.", "fd_table."))}}
    env = {}
    for name, key in config.KEYS.items():
        env[key.env] = samples.get(name, "true")
    c = load(environ=env)
    for name, key in config.KEYS.items():
        assert c.get(name) == (key.convert(env[key.env]) if not isinstance(c.get(name), tuple)
                               else tuple(key.convert(env[key.env]))), name


def test_as_dict_is_plain_and_frozen():
    c = load(environ={})
    d = c.as_dict()
    assert d["limiter"]["events_per_second"] == 3500
    assert isinstance(d["detections"]["rules"], list)
    assert isinstance(d["alert_output"]["outputs"][0], dict)
    d["alert_output"]["outputs"][0]["type"] = "changed"
    assert c.alert_output.outputs[0]["type"] == "stdout"  # a copy
    with pytest.raises(AttributeError):
        c.cpu_limit = 9  # frozen


def test_bpf_output_default_choices_and_bad():
    assert load(environ={}).bpf_output == "auto"
    assert load(environ={"CAPSULE8_BPF_OUTPUT": " RingBuf "}).bpf_output == "ringbuf"
    with pytest.raises(ConfigError, match="bpf_output: 'kafka' from CAPSULE8_BPF_OUTPUT: "
                                          "must be one of auto, ringbuf, perf"):
        load(environ={"CAPSULE8_BPF_OUTPUT": "kafka"})


def test_heartbeat_timeout_default_env_off_and_bad():
    assert load(environ={}).heartbeat_timeout == 30.0
    assert load(environ={"CAPSULE8_HEARTBEAT_TIMEOUT": "2500ms"}).heartbeat_timeout == 2.5
    assert load(environ={"CAPSULE8_HEARTBEAT_TIMEOUT": "0"}).heartbeat_timeout == 0.0
    with pytest.raises(ConfigError, match="heartbeat_timeout: 'soon' from "
                                          "CAPSULE8_HEARTBEAT_TIMEOUT: must be a duration"):
        load(environ={"CAPSULE8_HEARTBEAT_TIMEOUT": "soon"})


def test_resource_limits_need_both_keys():
    assert not load(environ={"CAPSULE8_USE_RESOURCE_LIMITS": "true"}).resource_limits_active
    assert load(environ={"CAPSULE8_USE_RESOURCE_LIMITS": "true",
                         "CAPSULE8_USE_SUPERVISOR": "true"}).resource_limits_active


def test_sample_config_documents_every_key():
    sample = os.path.join(os.path.dirname(__file__), "..", "..", "conf", "capsule8-sensor.yaml")
    c = load(sample, environ={})
    assert c.config_path == sample
    text = open(sample).read()
    for name, key in config.KEYS.items():
        assert name.split(".")[-1] in text, name
        assert key.env in text, key.env


def test_main_reports_config_error_with_exit_2(tmp_path, capsys, monkeypatch):
    from c8.supervisor.main import main

    monkeypatch.delenv("CAPSULE8_CONFIG", raising=False)
    path = write(tmp_path, "cpu_limit: 250\n")
    assert main(["--config", path]) == 2
    err = capsys.readouterr().err
    assert f"ConfigError: cpu_limit: 250 from {path}: must be an integer percentage" in err
