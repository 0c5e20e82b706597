"""The capability table: one source (privileges.ROLES) for the code, the doc and the tests."""

import os

import pytest

from c8.supervisor import privileges as P
from c8.supervisor.arbiter import child_specs, entry_points
from c8.supervisor.config import load

DOC = os.path.join(os.path.dirname(__file__), "..", "..", "docs", "security.md")


def test_doc_holds_the_generated_table():
    with open(DOC) as f:
        text = f.read()
    assert P.markdown() in text, "docs/security.md is stale: paste privileges.markdown() in"
    for title in P.ROLE_TITLES.values():
        assert title in text


def test_every_role_of_the_tree_is_in_the_table(monkeypatch):
    monkeypatch.setattr("c8.supervisor.config.DEFAULT_PATH", "/nonexistent/c8.yaml")
    cfg = load(environ={"CAPSULE8_DETECTIONS_ENABLED": "true", "CAPSULE8_EXPORT_ENABLED": "true"})
    roles = {s.role for s in child_specs(cfg, [0, 1], entry_points({}))}
    assert roles == set(P.ROLES) == set(P.ROLE_TITLES)


def test_no_role_keeps_sys_admin_or_more_than_it_needs_here():
    last = 40  # Linux 6.18 here: CAP_PERFMON (38) and CAP_BPF (39) exist
    caps = {role: set(P.role_caps(role, last)) for role in P.ROLES}
    assert caps == {
        "broker": {"CAP_SYS_PTRACE", "CAP_DAC_READ_SEARCH"},
        "collector0": {"CAP_PERFMON", "CAP_BPF", "CAP_IPC_LOCK", "CAP_DAC_OVERRIDE"},
        "collector": {"CAP_PERFMON", "CAP_IPC_LOCK", "CAP_DAC_READ_SEARCH"},
        "detector": {"CAP_DAC_READ_SEARCH"},
        "exporter": {"CAP_DAC_READ_SEARCH"},
    }
    for grants in P.ROLES.values():
        assert all(g.why for g in grants)


def test_sys_admin_stands_in_for_perfmon_and_bpf_on_old_kernels():
    assert P.role_caps("collector0", 37) == ("CAP_IPC_LOCK", "CAP_DAC_OVERRIDE", "CAP_SYS_ADMIN")
    assert "CAP_SYS_ADMIN" not in P.role_caps("broker", 37)


def test_expected_status_and_bounding():
    want = P.mask(["CAP_SYS_PTRACE", "CAP_DAC_READ_SEARCH"])
    assert P.expected_status("broker", bounding=(1 << 41) - 1) == {
        "CapInh": 0, "CapPrm": want, "CapEff": want, "CapBnd": want, "CapAmb": 0, "NoNewPrivs": 1}
    # a capability root's bounding set lacks is not asked for
    no_ptrace = ((1 << 41) - 1) & ~(1 << P.CAPS["CAP_SYS_PTRACE"])
    assert P.role_mask("broker", no_ptrace) == 1 << P.CAPS["CAP_DAC_READ_SEARCH"]
    with pytest.raises(KeyError):
        P.role_caps("nobody")


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root (setuid, capset)")
def test_drop_privileges_in_a_child_sets_exactly_the_role():
    want = P.role_mask("broker")
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            P.drop_privileges(65534, 65534, want)
            st = P.status_caps()
            ok = st == P.expected_status("broker") and os.getuid() == 65534
            try:  # CAP_SETUID is gone for good
                os.setuid(0)
            except PermissionError:
                code = 0 if ok else 2
        finally:
            os._exit(code)
    assert os.waitpid(pid, 0)[1] == 0
