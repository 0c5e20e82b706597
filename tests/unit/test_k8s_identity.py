"""Kubernetes identity: parsing each shape CRI runtimes leave (containerd's CRI
annotations, cri-o's annotations and Labels, the kubepods cgroup path alone),
hostile values, the container table's rows from fake runtime state, and the
k8s fields in filters (masks on batches and the reference evaluator agree).

The runtime state is written under tmp_path in the layouts the runtimes use
(no kubelet runs here); tests/integration/test_k8s_identity.py runs real runc
containers in kubepods cgroups.
"""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from c8 import schema
from c8.broker.containers import ContainerTable, parse_cgroup_path, pod_uid_of_cgroup
from c8.broker.runtimes import Roots
from c8.broker.runtimes.k8s import MAX_LABELS, K8s, from_annotations, labels_of
from c8.broker.runtimes.oci import from_annotations as oci_annotations
from c8.broker.runtimes.oci import read_containerd, read_runc
from c8.broker.runtimes.storage import read_storage
from c8.broker.runtimes.worker import Worker
from c8.expr import ExprTypeError, check, compile_mask, parse
from c8.expr.evaluate import evaluate
from c8.host.proc import Advertiser, argv

UID = "0d2c6f6a-1b2c-4d5e-8f90-123456789abc"
CTR = "f4bb97078648f006f904aa6c260e5d1d9e464d273cacef19c08ad20201e31e85"
SANDBOX = "ed836b6809d5b0e47b262eee2b0d4aa9b3c1c6d362c49f415fa508cc5ebd49b6"
OTHER = "38ea07063801541315a094adff22fe5edb0d313ece92adb1fba6a29da9c6fb67"

# what containerd's CRI plugin writes into a pod container's OCI spec
CONTAINERD_CRI = {
    "io.kubernetes.cri.container-type": "container",
    "io.kubernetes.cri.container-name": "nginx",
    "io.kubernetes.cri.image-name": "docker.io/library/nginx:1.25",
    "io.kubernetes.cri.sandbox-id": SANDBOX,
    "io.kubernetes.cri.sandbox-name": "web-7d4b9c-x2k8p",
    "io.kubernetes.cri.sandbox-namespace": "prod",
    "io.kubernetes.cri.sandbox-uid": UID,
}
# what cri-o writes: the kubelet's labels as JSON, and the pod's on the sandbox
CRIO_CONTAINER = {
    "io.kubernetes.cri-o.Name": "k8s_nginx_web-7d4b9c-x2k8p_prod_" + UID + "_0",
    "io.kubernetes.cri-o.ContainerType": "container",
    "io.kubernetes.cri-o.SandboxID": SANDBOX,
    "io.kubernetes.cri-o.ImageName": "docker.io/library/nginx:1.25",
    "io.kubernetes.container.name": "nginx",
    "io.kubernetes.pod.name": "web-7d4b9c-x2k8p",
    "io.kubernetes.pod.namespace": "prod",
    "io.kubernetes.pod.uid": UID,
    "io.kubernetes.cri-o.Labels": json.dumps({
        "io.kubernetes.container.name": "nginx", "io.kubernetes.pod.name": "web-7d4b9c-x2k8p",
        "io.kubernetes.pod.namespace": "prod", "io.kubernetes.pod.uid": UID}),
}
CRIO_SANDBOX = {
    "io.kubernetes.cri-o.Name": "k8s_POD_web-7d4b9c-x2k8p_prod_" + UID + "_0",
    "io.kubernetes.cri-o.ContainerType": "sandbox",
    "io.kubernetes.cri-o.SandboxID": SANDBOX,
    "io.kubernetes.pod.name": "web-7d4b9c-x2k8p",
    "io.kubernetes.pod.namespace": "prod",
    "io.kubernetes.pod.uid": UID,
    "io.kubernetes.container.name": "POD",
    "io.kubernetes.cri-o.Labels": json.dumps({
        "app": "web", "app.kubernetes.io/part-of": "shop", "pod-template-hash": "7d4b9c",
        "io.kubernetes.pod.name": "web-7d4b9c-x2k8p", "io.kubernetes.pod.namespace": "prod",
        "io.kubernetes.pod.uid": UID}),
}
POD_LABELS = (("app", "web"), ("app.kubernetes.io/part-of", "shop"), ("pod-template-hash", "7d4b9c"))


# -- the shapes --------------------------------------------------------------------
def test_containerd_cri_annotations():
    pod = from_annotations(CONTAINERD_CRI)
    assert pod == K8s("prod", "web-7d4b9c-x2k8p", UID, "nginx", (), SANDBOX)
    meta = oci_annotations("containerd", CONTAINERD_CRI, CTR)
    assert (meta.name, meta.image_name, meta.k8s) == ("nginx", "docker.io/library/nginx:1.25", pod)


def test_crio_annotations_and_labels():
    pod = from_annotations(CRIO_CONTAINER)
    # the container's Labels hold only the kubelet's own: no pod label
    assert pod == K8s("prod", "web-7d4b9c-x2k8p", UID, "nginx", (), SANDBOX)
    sandbox = from_annotations(CRIO_SANDBOX)
    assert sandbox.labels == POD_LABELS and sandbox.container_name == "POD"


def test_crio_identity_inside_labels_only():
    """The kubelet's labels name the pod when the top-level annotations do not."""
    labels = json.loads(CRIO_CONTAINER["io.kubernetes.cri-o.Labels"])
    pod = from_annotations({"io.kubernetes.cri-o.Labels": json.dumps(labels)})
    assert (pod.namespace, pod.pod_name, pod.pod_uid, pod.container_name) == (
        "prod", "web-7d4b9c-x2k8p", UID, "nginx")


def test_no_pod_annotations_no_identity():
    assert from_annotations({"nerdctl/name": "web", "org.opencontainers.image.ref.name": "busybox"}) is None
    assert oci_annotations("runc", {"nerdctl/name": "web"}, CTR).k8s is None


@pytest.mark.parametrize("path, uid", [
    (f"/kubepods/burstable/pod{UID}/{CTR}", UID),
    (f"4:memory:/kubepods/besteffort/pod{UID}/{CTR}", UID),
    (f"/kubepods/pod{UID}/{CTR}", UID),  # guaranteed QoS
    (f"0::/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{UID.replace('-', '_')}.slice/"
     f"cri-containerd-{CTR}.scope", UID),
    (f"/kubepods.slice/kubepods-pod{UID.replace('-', '_')}.slice/crio-{CTR}.scope", UID),
    (f"/kubepods/burstable/pod{'a' * 32}/{CTR}", "a" * 32),  # a static pod: a hash for uid
    (f"/kubepods/burstable/pod{UID.upper()}/{CTR}", ""),  # the kubelet writes lower case
    (f"/docker/{CTR}", ""),
    (f"/pod{UID}/{CTR}", ""),  # not under kubepods
    (f"/kubepods/burstable/pod{UID}x/{CTR}", ""),
    (f"/kubepods/burstable/pod{UID[:-1]}/{CTR}", ""),
    (f"/kubepods/burstable/pod../{CTR}", ""),
])
def test_pod_uid_from_the_cgroup_path(path, uid):
    assert pod_uid_of_cgroup(path) == uid
    assert parse_cgroup_path(path) is None or parse_cgroup_path(path)[1] == CTR


# -- hostile values -------------------------------------------------------------------
@pytest.mark.parametrize("notes", [
    None, [], "x", {"io.kubernetes.cri.sandbox-namespace": 7},
    {"io.kubernetes.cri.sandbox-namespace": ["prod"]},
    {"io.kubernetes.cri-o.Labels": "{not json"},
    {"io.kubernetes.cri-o.Labels": json.dumps(["app=web"])},
    {"io.kubernetes.cri-o.Labels": json.dumps({"app": 1, "tier": None, "x": {"y": "z"}})},
    {"io.kubernetes.cri-o.Labels": "[" * 100000},
    {"io.kubernetes.cri.sandbox-namespace": "x" * 64},  # longer than a DNS label
    {"io.kubernetes.cri.sandbox-namespace": "pro d"},
    {"io.kubernetes.pod.namespace": "prod\n"},
    {"io.kubernetes.cri.sandbox-uid": "not-a-uid"},
    {"io.kubernetes.cri.sandbox-name": "\x1b[31mred"},
    {"io.kubernetes.cri.sandbox-id": "../../etc"},
])
def test_hostile_annotations_give_no_identity(notes):
    assert from_annotations(notes) is None


def test_hostile_values_are_dropped_the_rest_kept():
    pod = from_annotations({**CONTAINERD_CRI, "io.kubernetes.cri.sandbox-name": "p" * 254,
                            "io.kubernetes.cri.sandbox-uid": UID + "0"})
    assert (pod.namespace, pod.pod_name, pod.pod_uid, pod.container_name) == ("prod", "", "", "nginx")


def test_labels_bounded_and_checked():
    labels = {f"k{i:03d}": "v" for i in range(200)}
    labels.update({"bad key": "v", "k=v": "x", "ok": "bad value", "long": "v" * 64, "x" * 64: "v",
                   "example.com/team": "a-b_c.d", "-lead": "v", "tail": "v-", "empty": "",
                   "io.kubernetes.pod.name": "p", "caf\u00e9": "v", "a/b/c": "v"})
    got = labels_of(json.dumps(labels))
    assert len(got) == MAX_LABELS
    assert got == tuple(sorted([("empty", ""), ("example.com/team", "a-b_c.d")]
                               + [(f"k{i:03d}", "v") for i in range(200)])[:MAX_LABELS])
    assert labels_of({"a": "1", "b": 2}) == (("a", "1"),)
    assert labels_of("null") == () and labels_of(None) == ()


def test_labels_json_over_the_annotation_cap_reads_as_none():
    """Annotation values are cut at 4096 characters (c8.host.typed): a Labels
    JSON longer than that is malformed once cut, so no label (never a part)."""
    big = json.dumps({f"label-{i:04d}": "value-" + "x" * 50 for i in range(100)})
    assert len(big) > 4096
    pod = from_annotations({**CRIO_CONTAINER, "io.kubernetes.cri-o.Labels": big})
    assert pod.labels == () and pod.namespace == "prod"


# -- the container table, from fake runtime state -------------------------------------------
def write(path, doc):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        f.write(doc if isinstance(doc, str) else json.dumps(doc))


def fake_pid(proc, pid, cgroup_path, comm="sh"):
    write(f"{proc}/{pid}/cgroup", f"4:memory:{cgroup_path}\n0::{cgroup_path}\n")
    write(f"{proc}/{pid}/stat", f"{pid} ({comm}) S 1 {pid} {pid} 0 -1 0 0 0 0 0 0 0 0 0 20 0 1 0 100 0 0\n")
    write(f"{proc}/{pid}/cmdline", f"{comm}\0")


def table(tmp_path, **roots) -> ContainerTable:
    return ContainerTable(str(tmp_path / "proc"), Roots(**{
        "docker": [], "docker_sockets": [], "storage": [], "runc": [], "crun": [], "containerd": [],
        **roots}), discover_roots=False, worker=Worker(threaded=False),
        advertiser=lambda pid, proc: Advertiser(argv(pid, proc), 0, True))


def test_containerd_pod_row(tmp_path):
    ctrd = str(tmp_path / "containerd")
    task = f"{ctrd}/io.containerd.runtime.v2.task/k8s.io"
    write(f"{task}/{CTR}/config.json", {"annotations": CONTAINERD_CRI})
    write(f"{task}/{SANDBOX}/config.json", {"annotations": {
        "io.kubernetes.cri.container-type": "sandbox", "io.kubernetes.cri.sandbox-id": SANDBOX,
        "io.kubernetes.cri.sandbox-name": "web-7d4b9c-x2k8p", "io.kubernetes.cri.sandbox-namespace": "prod",
        "io.kubernetes.cri.sandbox-uid": UID}})
    assert read_containerd([ctrd], CTR).k8s.namespace == "prod"
    fake_pid(str(tmp_path / "proc"), 10, f"/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod"
                                         f"{UID.replace('-', '_')}.slice/cri-containerd-{CTR}.scope")
    fake_pid(str(tmp_path / "proc"), 11, f"/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod"
                                         f"{UID.replace('-', '_')}.slice/cri-containerd-{SANDBOX}.scope", "pause")
    t = table(tmp_path, containerd=[ctrd])
    ctr, sandbox = t.lookup_pid(10), t.lookup_pid(11)
    assert t.row(ctr) == (CTR, "nginx", "", "docker.io/library/nginx:1.25", "containerd",
                          "prod", "web-7d4b9c-x2k8p", UID, "nginx", {})
    assert t.row(sandbox)[5:] == ("prod", "web-7d4b9c-x2k8p", UID, "", {})


def test_crio_pod_row_takes_the_sandbox_labels(tmp_path):
    storage = str(tmp_path / "storage")
    write(f"{storage}/overlay-containers/containers.json", [
        {"id": CTR, "names": ["k8s_nginx"], "image": "1" * 64, "metadata": "{}"},
        {"id": SANDBOX, "names": ["k8s_POD"], "image": "2" * 64, "metadata": "{}"}])
    write(f"{storage}/overlay-containers/{CTR}/userdata/config.json", {"annotations": CRIO_CONTAINER})
    write(f"{storage}/overlay-containers/{SANDBOX}/userdata/config.json", {"annotations": CRIO_SANDBOX})
    assert read_storage([storage], CTR).k8s.labels == ()  # the container's own hold none
    fake_pid(str(tmp_path / "proc"), 10, f"/kubepods/burstable/pod{UID}/crio-{CTR}")
    t = table(tmp_path, storage=[storage])
    row = t.row(t.lookup_pid(10))
    assert row[4:] == ("cri-o", "prod", "web-7d4b9c-x2k8p", UID, "nginx", dict(POD_LABELS))


def test_cgroup_only_pod_uid(tmp_path):
    """No runtime state anywhere: the kubepods path still gives the pod uid."""
    fake_pid(str(tmp_path / "proc"), 10, f"/kubepods/besteffort/pod{UID}/{CTR}")
    fake_pid(str(tmp_path / "proc"), 11, f"/docker/{OTHER}")
    t = table(tmp_path)
    assert t.row(t.lookup_pid(10)) == (CTR, "", "", "", "kubernetes", "", "", UID, "", {})
    assert t.row(t.lookup_pid(11))[5:] == ("", "", "", "", {})


def test_runc_state_with_cri_annotations(tmp_path):
    """runc copies the bundle's annotations into state.json's labels: a pod's
    container run by runc under containerd or cri-o is named from there."""
    runc = str(tmp_path / "runc")
    write(f"{runc}/{CTR}/state.json", {"config": {"labels": [f"{k}={v}" for k, v in CONTAINERD_CRI.items()]
                                                  + ["bundle=/nowhere"]}})
    assert read_runc([runc], CTR).k8s == K8s("prod", "web-7d4b9c-x2k8p", UID, "nginx", (), SANDBOX)
    fake_pid(str(tmp_path / "proc"), 10, f"/kubepods/burstable/pod{UID}/{CTR}")
    t = table(tmp_path, runc=[runc])
    assert t.row(t.lookup_pid(10))[4:] == ("runc", "prod", "web-7d4b9c-x2k8p", UID, "nginx", {})


def test_hostile_sandbox_state_leaves_labels_empty(tmp_path):
    storage = str(tmp_path / "storage")
    write(f"{storage}/overlay-containers/containers.json", [
        {"id": CTR, "names": ["k8s_nginx"], "metadata": "{}"}, {"id": SANDBOX, "metadata": "{}"}])
    write(f"{storage}/overlay-containers/{CTR}/userdata/config.json", {"annotations": CRIO_CONTAINER})
    os.makedirs(f"{storage}/overlay-containers/{SANDBOX}/userdata")
    os.symlink("/etc/passwd", f"{storage}/overlay-containers/{SANDBOX}/userdata/config.json")
    fake_pid(str(tmp_path / "proc"), 10, f"/kubepods/burstable/pod{UID}/crio-{CTR}")
    t = table(tmp_path, storage=[storage])
    assert t.row(t.lookup_pid(10))[5:] == ("prod", "web-7d4b9c-x2k8p", UID, "nginx", {})


# -- filters -------------------------------------------------------------------------
ROWS = {1: (CTR, "nginx", "", "nginx:1.25", "containerd", "prod", "web-1", UID, "nginx",
            {"app": "web", "team": "a"}),
        2: (OTHER, "db", "", "postgres", "docker", "", "", "", "", {}),
        3: (SANDBOX, "api", "", "api:2", "cri-o", "staging", "api-1", "b" * 32, "api", {"app": "api"})}


@pytest.mark.parametrize("text, expected", [
    ('k8s_namespace == "prod"', [0, 1, 0, 0, 0]),
    ('k8s_namespace is null', [1, 0, 1, 0, 1]),
    ('k8s_namespace is not null', [0, 1, 0, 1, 0]),
    ('k8s_pod_name like "api-*"', [0, 0, 0, 1, 0]),
    (f'k8s_pod_uid == "{UID}"', [0, 1, 0, 0, 0]),
    ('k8s_container_name in ("nginx", "api")', [0, 1, 0, 1, 0]),
    ('k8s_labels == "app=web"', [0, 1, 0, 0, 0]),
    ('k8s_labels == "team=a"', [0, 1, 0, 0, 0]),
    ('k8s_labels == "app"', [0, 0, 0, 0, 0]),
    ('k8s_labels like "app=*"', [0, 1, 0, 1, 0]),
    ('k8s_labels like "team=*"', [0, 1, 0, 0, 0]),
    ('k8s_labels in ("app=api", "team=b")', [0, 0, 0, 1, 0]),
    ('k8s_labels != "app=web"', [1, 0, 1, 1, 1]),  # no label is app=web
    ('not k8s_labels == "app=web"', [1, 0, 1, 1, 1]),
    ('k8s_labels not like "app=*"', [1, 0, 1, 0, 1]),
    ('k8s_labels not in ("app=web")', [1, 0, 1, 1, 1]),
    ('k8s_labels is null', [1, 0, 1, 0, 1]),
    ('k8s_labels is not null', [0, 1, 0, 1, 0]),
    ('k8s_namespace == "prod" and k8s_labels == "app=web" and filename like "/etc/*"', [0, 1, 0, 0, 0]),
])
def test_k8s_fields_filter_like_container_fields(text, expected):
    batch = schema.empty("file", 5)
    batch["container"] = [0, 1, 2, 3, 9]  # 9: not in the table, as the host
    batch["filename"] = b"/etc/passwd"
    node = parse(text)
    check(node, "file")
    got = compile_mask(node, "file")(batch, ROWS)
    assert got.astype(int).tolist() == expected
    # the reference evaluator on the client's event dicts agrees
    for index, want in zip(batch["container"].tolist(), expected, strict=True):
        row = ROWS.get(index, ("",) * 9 + ({},))
        event = {"filename": "/etc/passwd", "k8s_namespace": row[5], "k8s_pod_name": row[6],
                 "k8s_pod_uid": row[7], "k8s_container_name": row[8], "k8s_labels": row[9]}
        assert evaluate(node, event) == bool(want), (text, index)


def test_k8s_fields_type_checks():
    with pytest.raises(ExprTypeError):
        check(parse("k8s_namespace == 3"), "process")
    with pytest.raises(ExprTypeError):
        check(parse("k8s_labels == 3"), "process")
    check(parse('k8s_labels like "*" and k8s_pod_uid is null'), "container")


def test_rows_without_k8s_slots_read_as_outside_a_pod():
    batch = schema.empty("process", 2)
    batch["container"] = [1, 0]
    old = {1: ("c1", "web", "", "busybox", "docker")}
    assert compile_mask(parse('k8s_namespace is null'), "process")(batch, old).tolist() == [True, True]
    assert compile_mask(parse('k8s_labels is null'), "process")(batch, old).tolist() == [True, True]
    assert not np.any(compile_mask(parse('k8s_labels == "a=b"'), "process")(batch, old))


def test_subscription_container_filter_reads_full_rows():
    """The spec's containers filter (image, ids, names) on rows with Kubernetes slots."""
    from c8.broker.subscriptions import parse_spec

    batch = schema.empty("process", 4)
    batch["container"] = [0, 1, 2, 3]
    for spec, want in (({"image": "nginx*"}, [0, 1, 0, 0]), ({"names": ["api"]}, [0, 0, 0, 1]),
                       ({"ids": [OTHER[:12]]}, [0, 0, 1, 0])):
        sub = parse_spec({"events": {"process": {}}, "containers": spec}, b"p")
        assert sub.container_mask(batch, {0: ("",) * 9 + ({},), **ROWS}).astype(int).tolist() == want
