"""export.* configuration: nested keys from file and environment, errors naming the key,
the exporter child and the detector's alert file for it, nats-py connect options."""

from __future__ import annotations

import pytest

from c8.export.publisher import connect_options
from c8.supervisor import config
from c8.supervisor.arbiter import child_specs, entry_points


def load(tmp_path, text: str = "", env: dict | None = None):
    path = tmp_path / "c.yaml"
    path.write_text(text)
    return config.load(str(path), environ=env or {})


def test_defaults_export_nothing(tmp_path):
    c = load(tmp_path)
    assert not c.export.enabled
    assert c.export.nats.url == ("nats://127.0.0.1:4222",) and c.export.nats.stream == "C8"
    assert c.export.spool_bytes == 256 << 20 and c.export.events == {}
    assert "c8-exporter" not in [s.name for s in child_specs(c, [0], entry_points({}))]


def test_nested_keys_from_the_file_and_the_environment(tmp_path):
    c = load(tmp_path, "export:\n  enabled: true\n  spool_bytes: 8M\n"
                       "  events: {events: {process: {filter: 'kind == \"EXEC\"'}}}\n"
                       "  nats:\n    url: [nats://a:4222, tls://b:4443]\n    replicas: 3\n"
                       "    max_age: 1h\n",
             {"CAPSULE8_EXPORT_NATS_STREAM": "FLEET", "CAPSULE8_EXPORT_NATS_TOKEN": "t0k"})
    assert c.export.enabled and c.export.spool_bytes == 8 << 20
    assert c.export.nats.url == ("nats://a:4222", "tls://b:4443")
    assert (c.export.nats.replicas, c.export.nats.max_age) == (3, 3600.0)
    assert c.export.nats.stream == "FLEET" and c.export.nats.token == "t0k"
    assert c.export.events == {"events": {"process": {"filter": 'kind == "EXEC"'}}}
    spec = [s for s in child_specs(c, [0], entry_points({})) if s.name == "c8-exporter"]
    assert len(spec) == 1 and spec[0].role == "exporter" and spec[0].entry == "c8.export.main:run"
    d = c.as_dict()["export"]
    assert d["nats"]["url"] == ["nats://a:4222", "tls://b:4443"]  # plain lists for the child


@pytest.mark.parametrize("env,words", [
    ({"CAPSULE8_EXPORT_NATS_URL": "http://x:1"}, ["export.nats.url", "http://x:1"]),
    ({"CAPSULE8_EXPORT_NATS_STREAM": "a.b"}, ["export.nats.stream", "a.b"]),
    ({"CAPSULE8_EXPORT_SPOOL_BYTES": "0"}, ["export.spool_bytes", "at least 1M"]),
    ({"CAPSULE8_EXPORT_EVENTS": "procss"}, ["export.events", "unknown event type 'procss'"]),
    ({"CAPSULE8_EXPORT_EVENTS": '{events: {file: {filter: "nope == 1"}}}'},
     ["export.events", "events.file", "unknown field 'nope'"]),
])
def test_bad_values_name_the_key(tmp_path, env, words):
    with pytest.raises(config.ConfigError) as err:
        load(tmp_path, env=env)
    for w in words:
        assert w in str(err.value)


def test_unknown_nested_key_is_refused(tmp_path):
    with pytest.raises(config.ConfigError, match="export.nats.servers: unknown key"):
        load(tmp_path, "export:\n  nats:\n    servers: [nats://a:1]\n")


def test_detector_gets_the_alert_file_only_when_both_run(tmp_path):
    both = load(tmp_path, env={"CAPSULE8_EXPORT_ENABLED": "1", "CAPSULE8_DETECTIONS_ENABLED": "1",
                               "CAPSULE8_EXPORT_SPOOL_DIR": "/sp"})
    outs = both.as_dict()["alert_output"]["outputs"]
    assert outs[-1]["name"] == "export" and outs[-1]["path"] == "/sp/alerts.jsonl"
    assert outs[-1]["type"] == "file" and outs[-1]["backups"] == 1
    # the Config itself is as written; as_dict adds the alert file and the export's
    assert [o.get("name") for o in outs[-2:]] == ["alerts_file", "export"]
    assert len(both.alert_output.outputs) == len(outs) - 2
    only = load(tmp_path, env={"CAPSULE8_EXPORT_ENABLED": "1", "CAPSULE8_DETECTIONS_ENABLED": "0"})
    assert all(o.get("name") != "export" for o in only.as_dict()["alert_output"]["outputs"])


def test_connect_options_follow_the_nats_keys(tmp_path):
    c = load(tmp_path, env={"CAPSULE8_EXPORT_NATS_URL": "nats://a:1,nats://b:2",
                            "CAPSULE8_EXPORT_NATS_USER": "u", "CAPSULE8_EXPORT_NATS_PASSWORD": "p",
                            "CAPSULE8_EXPORT_NATS_CREDS_FILE": "/c.creds",
                            "CAPSULE8_EXPORT_NATS_NKEYS_SEED_FILE": "/s.nk"})
    opts = connect_options(c.as_dict()["export"]["nats"])
    assert opts["servers"] == ["nats://a:1", "nats://b:2"]
    assert (opts["user"], opts["password"]) == ("u", "p")
    assert opts["user_credentials"] == "/c.creds" and opts["nkeys_seed"] == "/s.nk"
    assert opts["max_reconnect_attempts"] == -1 and "tls" not in opts
