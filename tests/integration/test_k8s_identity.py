"""Kubernetes identity end to end: runc containers shaped as a CRI runtime makes
them -> kernel -> collectors -> broker -> a subscriber filtering on k8s fields.

No kubelet runs here, so the tests do what containerd's CRI plugin and cri-o do
for a pod: runc runs a bundle whose config.json carries their io.kubernetes.*
annotations, in the kubelet's cgroupfs layout
(/sys/fs/cgroup/<controller>/kubepods/burstable/pod<uid>/<id>). A subscription
with ``k8s_namespace == "<this test's namespace>"`` must get the container's
RUNNING and an exec inside it with every k8s field right, and nothing of a
plain runc container running beside it (whose exec a second subscription does
see, so its absence means the filter, not a miss). Also cri-o's shape (pod
labels from the sandbox, filtered by label) and the cgroup path alone (pod
uid). Namespaces and uids are unique per test, so other users' containers
never match.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import subprocess
import uuid

import pytest

from tests.integration.sensor import Sensor

from .runtimes import Runc, sh
from .test_containers_e2e import collect

pytestmark = [pytest.mark.root, pytest.mark.containers, pytest.mark.timeout(240)]

CGROUP_ROOT = "/sys/fs/cgroup"


@pytest.fixture(scope="module")
def ksensor(tmp_path_factory):
    s = Sensor(tmp_path_factory.mktemp("ksensor")).start()
    yield s
    s.stop()


class Pod:
    """A pod as a CRI runtime leaves it: its uid, its kubepods cgroup parent, and
    runc containers in it with CRI annotations. ``close`` deletes the containers
    and removes the pod's cgroups (the kubelet's job; runc removes only its own)."""

    def __init__(self, rt: Runc, namespace: str, name: str) -> None:
        self.rt, self.namespace, self.name = rt, namespace, name
        self.uid = str(uuid.uuid4())
        self.parent = f"/kubepods/burstable/pod{self.uid}"
        self.ids: list[str] = []

    def start(self, argv: list[str], annotations: dict[str, str], cid: str | None = None) -> str:
        """Run ``argv`` detached in a new container of this pod; its id."""
        cid = cid or secrets.token_hex(32)
        spec = json.loads(json.dumps(self.rt.spec))
        spec["process"].update(terminal=False, args=argv)
        spec["root"] = {"path": self.rt.rootfs, "readonly": True}
        spec["annotations"] = annotations
        spec["linux"]["cgroupsPath"] = f"{self.parent}/{cid}"
        bundle = os.path.join(self.rt.base, cid)
        os.makedirs(bundle)
        with open(os.path.join(bundle, "config.json"), "w") as f:
            json.dump(spec, f)
        self.ids.append(cid)
        log = os.path.join(self.rt.base, f"{cid}.log")
        with open(log, "wb") as out:  # the container inherits runc's stdio: a file, never a pipe
            rc = subprocess.run([self.rt.exe, "--root", self.rt.root, "run", "-d", "--bundle", bundle, cid],
                                stdin=subprocess.DEVNULL, stdout=out, stderr=out, timeout=60).returncode
        if rc:
            with open(log) as f:
                pytest.fail(f"runc run -d exited {rc}: {f.read().strip()}", pytrace=False)
        return cid

    def close(self) -> None:
        for cid in self.ids:
            self.rt.stop(cid)
        for hierarchy in os.listdir(CGROUP_ROOT):
            path = f"{CGROUP_ROOT}/{hierarchy}{self.parent}"
            # the pod, then kubepods/burstable and kubepods when no other pod is left
            for d in [*(f"{path}/{cid}" for cid in self.ids), path, os.path.dirname(path),
                      os.path.dirname(os.path.dirname(path))]:
                with contextlib.suppress(OSError):
                    os.rmdir(d)


@pytest.fixture
def pod(request):
    rt = request.getfixturevalue("runc")
    p = Pod(rt, "c8-ns-" + secrets.token_hex(4), "web-" + secrets.token_hex(3))
    yield p
    p.close()


def containerd_cri(pod: Pod, container_name: str, sandbox_id: str) -> dict[str, str]:
    """The annotations containerd's CRI plugin writes into a pod container's spec."""
    return {"io.kubernetes.cri.container-type": "container",
            "io.kubernetes.cri.container-name": container_name,
            "io.kubernetes.cri.image-name": "docker.io/library/busybox:1.36",
            "io.kubernetes.cri.sandbox-id": sandbox_id,
            "io.kubernetes.cri.sandbox-name": pod.name,
            "io.kubernetes.cri.sandbox-namespace": pod.namespace,
            "io.kubernetes.cri.sandbox-uid": pod.uid}


def crio(pod: Pod, container_name: str, sandbox_id: str, labels: dict[str, str]) -> dict[str, str]:
    """The annotations cri-o writes (Labels: the kubelet's own, plus the pod's on a sandbox)."""
    kubelet = {"io.kubernetes.pod.name": pod.name, "io.kubernetes.pod.namespace": pod.namespace,
               "io.kubernetes.pod.uid": pod.uid}
    if container_name != "POD":
        kubelet["io.kubernetes.container.name"] = container_name
    return {"io.kubernetes.cri-o.Name": f"k8s_{container_name}_{pod.name}_{pod.namespace}_{pod.uid}_0",
            "io.kubernetes.cri-o.ContainerType": "sandbox" if container_name == "POD" else "container",
            "io.kubernetes.cri-o.SandboxID": sandbox_id,
            "io.kubernetes.cri-o.ImageName": "docker.io/library/busybox:1.36",
            "io.kubernetes.container.name": container_name,
            **kubelet,
            "io.kubernetes.cri-o.Labels": json.dumps({**labels, **kubelet})}


EVENTS_OF = ("container", "process")


def subscribe(sensor: Sensor, expr: str):
    return sensor.client.subscribe({"events": {c: {"filter": expr} for c in EVENTS_OF}})


def k8s(ev: dict) -> tuple:
    return (ev["k8s_namespace"], ev["k8s_pod_name"], ev["k8s_pod_uid"], ev["k8s_container_name"], ev["k8s_labels"])


def probe_exec(cid: str):
    """done() once the EXEC of the probe inside ``cid`` has come."""
    return lambda evs: any(e["type"] == "process" and e["kind"] == "EXEC" and e["container_id"] == cid
                           and e["exec_command_line"] == "/bin/true k8s-probe" for e in evs)


def test_containerd_cri_pod_filtered_by_namespace(ksensor, pod, request):
    rt = request.getfixturevalue("runc")
    sandbox = secrets.token_hex(32)  # the pod's pause container: named, not run here
    with subscribe(ksensor, f'k8s_namespace == "{pod.namespace}"') as sub, \
            ksensor.client.subscribe({"events": {"process": {
                "filter": 'exec_command_line == "/bin/true plain-probe"'}}}) as everyone:
        # a plain runc container beside it: same runtime and image, no pod
        plain = rt.start(["sh", "-c", "/bin/true plain-probe; exec sleep 600"])
        seen = collect(everyone, lambda evs: any(e["container_id"] == plain.container_id
                                                 and e.get("exec_command_line") == "/bin/true plain-probe"
                                                 for e in evs))
        assert any(e["container_id"] == plain.container_id and e["type"] == "process" for e in seen), \
            "the plain container's exec was not observed at all"
        cid = pod.start(["sleep", "600"], containerd_cri(pod, "app", sandbox))
        sh([rt.exe, "--root", rt.root, "exec", cid, "/bin/true", "k8s-probe"])
        events = collect(sub, probe_exec(cid))
    rt.stop(plain.container_id)
    want = (pod.namespace, pod.name, pod.uid, "app", {})
    assert events, "no event matched the namespace filter"
    for e in events:  # every event matched the filter: this pod's container only
        if e["type"] in ("lost", "limiter"):
            continue
        assert e["container_id"] == cid, e
        assert k8s(e) == want, e
    running = [e for e in events if e["type"] == "container" and e["kind"] == "RUNNING"]
    # (its runtime column is set when it is made: "kubernetes" from the path if the metadata
    # came later, under load; the table fields below are resolved when it is sent)
    assert len(running) == 1
    assert running[0]["name"] == "app" and running[0]["image_name"] == "docker.io/library/busybox:1.36"
    probe = [e for e in events if probe_exec(cid)([e])]
    assert len(probe) == 1 and probe[0]["exec_filename"] == "/bin/true"
    assert probe[0]["container_name"] == "app"
    assert not any(e["container_id"] == plain.container_id for e in events)


def test_crio_pod_labels_from_its_sandbox(ksensor, pod):
    """cri-o keeps the pod's labels on its sandbox: the container's events carry
    them (the sandbox's annotations read through runc's state), and a label
    filter selects them."""
    labels = {"app": "web", "app.kubernetes.io/part-of": "c8-" + secrets.token_hex(3)}
    sandbox = secrets.token_hex(32)
    pod.start(["sleep", "600"], crio(pod, "POD", sandbox, labels), cid=sandbox)
    part_of = f'k8s_labels == "app.kubernetes.io/part-of={labels["app.kubernetes.io/part-of"]}"'
    with subscribe(ksensor, f"{part_of} and k8s_container_name == \"nginx\"") as sub:
        cid = pod.start(["sh", "-c", "/bin/true k8s-probe; exec sleep 600"], crio(pod, "nginx", sandbox, {}))
        events = collect(sub, probe_exec(cid))
    want = (pod.namespace, pod.name, pod.uid, "nginx", labels)
    mine = [e for e in events if e["type"] not in ("lost", "limiter")]
    assert mine and all(e["container_id"] == cid and k8s(e) == want for e in mine), mine
    assert [e["kind"] for e in mine if e["type"] == "container" and e["kind"] == "RUNNING"] == ["RUNNING"]
    assert len([e for e in mine if probe_exec(cid)([e])]) == 1


def test_pod_uid_from_the_kubepods_cgroup_alone(ksensor, pod):
    """No CRI annotation at all: the kubelet's cgroup path still names the pod."""
    with subscribe(ksensor, f'k8s_pod_uid == "{pod.uid}"') as sub:
        cid = pod.start(["sh", "-c", "/bin/true k8s-probe; exec sleep 600"], {"nerdctl/name": "bare"})
        events = collect(sub, probe_exec(cid))
    mine = [e for e in events if e["type"] not in ("lost", "limiter")]
    assert mine and all(e["container_id"] == cid and k8s(e) == ("", "", pod.uid, "", {}) for e in mine), mine
    # known from the path at first sight, so even CREATED (made at the cgroup's mkdir) carries it
    assert [e["kind"] for e in mine if e["type"] == "container"] == ["CREATED", "RUNNING"]
    assert len([e for e in mine if probe_exec(cid)([e])]) == 1
