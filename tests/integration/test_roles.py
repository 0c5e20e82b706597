"""Roles at the real broker: who may place probes, see and end which subscriptions.

Non-root clients are forked children of the test that drop to an unused uid
with the sensor group as their only group (a member of the sensor group, as
the control socket's mode requires) and then use the ordinary Client
library; the broker learns their uid from the kernel (SO_PEERCRED). Root's
Python lives under /root, which other users cannot read, so the children
never exec: they only run code this process has already imported.
"""

from __future__ import annotations

import json
import os
import pwd
import select
import shutil
import signal
import subprocess
import tempfile
import time
import traceback
import uuid
from pathlib import Path

import pytest

from c8.clients.client import SensorError
from c8.probes import find_tracefs
from c8.protocol import errors
from tests.integration.sensor import Sensor, wait_for

pytestmark = pytest.mark.root

DATA = Path(__file__).parent / "data"
SUBSCRIBER_UID = 64101  # members of the sensor group, not named in allow_probes
OTHER_UID = 64102
PROBER_UID = 64103      # named in allow_probes
STEAL_PW = "pw=+0(%di):string"  # the attack: a string read through a pointer argument


class UserClient:
    """A Client running as ``uid`` (group: the sensor's) in a forked child, driven over pipes.

    ``call(op, **args)`` returns the child's answer: a dict, or
    ``{"error": code, "reason": ...}`` when the broker refused.
    """

    def __init__(self, run_dir: str, uid: int, gid: int):
        to_child_r, self._to_child = os.pipe()
        self._from_child, from_child_w = os.pipe()
        self.pid = os.fork()
        if self.pid == 0:  # the child: drop, then serve requests until "exit"
            code = 0
            try:
                os.close(self._to_child)
                os.close(self._from_child)
                os.setgroups([gid])
                os.setresgid(gid, gid, gid)
                os.setresuid(uid, uid, uid)
                os.chdir("/")
                _serve(run_dir, os.fdopen(to_child_r, "r"), os.fdopen(from_child_w, "w"))
            except BaseException:
                traceback.print_exc()
                code = 1
            os._exit(code)
        os.close(to_child_r)
        os.close(from_child_w)
        self._out = os.fdopen(self._to_child, "w")
        self._in = os.fdopen(self._from_child, "r")

    def call(self, op: str, timeout: float = 30.0, **args) -> dict:
        self._out.write(json.dumps({"op": op, **args}) + "\n")
        self._out.flush()
        ready, _, _ = select.select([self._in], [], [], timeout)
        assert ready, f"the uid-dropped client did not answer {op} within {timeout}s"
        line = self._in.readline()
        assert line, f"the uid-dropped client died during {op}"
        return json.loads(line)

    def close(self) -> None:
        try:
            self.call("exit", timeout=5)
        except (AssertionError, OSError, ValueError):
            pass
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            if os.waitpid(self.pid, os.WNOHANG)[0]:
                return
            time.sleep(0.05)
        os.kill(self.pid, signal.SIGKILL)
        os.waitpid(self.pid, 0)


def _serve(run_dir: str, requests, answers) -> None:
    """The child's loop: one JSON request per line, one JSON answer per line."""
    from c8.clients.client import Client

    client = Client(run_dir, timeout=5.0)
    subs = {}
    for line in requests:
        req = json.loads(line)
        op = req.pop("op")
        if op == "exit":
            answers.write("{}\n")
            answers.flush()
            break
        try:
            if op == "subscribe":
                sub = client.subscribe(req["spec"])
                subs[sub.id] = sub
                answer = {"subscription": sub.id}
            elif op == "exec_and_wait":  # run /bin/true TOKEN, read its EXEC from a subscription
                sub = subs[req["subscription"]]
                p = subprocess.Popen(["/bin/true", req["token"]], cwd="/")
                p.wait()
                seen = []
                for ev in sub.events(timeout=15, idle=15):
                    if ev.get("kind") == "EXEC" and req["token"] in ev.get("exec_command_line", ""):
                        seen.append({"pid": ev["process_pid"], "uid": ev.get("uid"),
                                     "command_line": ev["exec_command_line"]})
                        break
                answer = {"pid": p.pid, "seen": seen}
            elif op == "list":
                answer = {"subscriptions": [s["subscription"] for s in client.subscriptions()]}
            elif op == "status":
                st = client.status()
                answer = {"subscriptions": [s["subscription"] for s in st["subscriptions"]], "plan": st["plan"]}
            elif op == "unsubscribe":
                client.unsubscribe(req["subscription"])
                answer = {}
            elif op == "probes":
                answer = {"probes": client.request("probes")["probes"]}
            else:
                answer = {"error": -1, "reason": f"unknown op {op}"}
        except SensorError as exc:
            answer = {"error": exc.code, "reason": exc.reason}
        except Exception as exc:  # shown in the test's assertion, not lost with the child
            answer = {"error": "exception", "reason": f"{type(exc).__name__}: {exc}"}
        answers.write(json.dumps(answer, default=str) + "\n")
        answers.flush()
    for sub in subs.values():
        sub.close()


@pytest.fixture(scope="module")
def target(tmp_path_factory):
    gcc = shutil.which("gcc") or shutil.which("cc")
    if gcc is None:
        pytest.fail("needs a C compiler for the probe target")
    binary = tmp_path_factory.mktemp("probe_target") / "c8_probe_target"
    subprocess.run([gcc, "-O1", "-o", str(binary), str(DATA / "probe_target.c")], check=True)
    return str(binary)


@pytest.fixture(scope="module")
def roles_sensor():
    # pytest's own temp dirs are root's (0700): the clients must reach the socket
    base = tempfile.mkdtemp(prefix="c8-roles-")
    os.chmod(base, 0o711)
    s = Sensor(Path(base), allow_probes=[str(PROBER_UID)]).start()
    s.gid = pwd.getpwnam("capsule8").pw_gid  # sensor_user, made by the supervisor
    # The children cannot import from /root: run here once what they run (lazy imports included)
    tok = token()
    with s.client.subscribe({"events": {"process": {"filter": f'exec_command_line like "*{tok}*"'}}}) as sub:
        subprocess.run(["/bin/true", tok], check=True)
        assert any(tok in e["exec_command_line"] for e in sub.events(timeout=15, idle=15) if e["kind"] == "EXEC")
    yield s
    s.stop()
    shutil.rmtree(base, ignore_errors=True)


@pytest.fixture
def as_user(roles_sensor):
    made = []

    def make(uid: int) -> UserClient:
        c = UserClient(roles_sensor.run_dir, uid, roles_sensor.gid)
        made.append(c)
        return c

    yield make
    for c in made:
        c.close()


def c8probes_lines() -> list[str]:
    return [ln for ln in Path(find_tracefs(), "uprobe_events").read_text().splitlines() if "c8probes" in ln]


def token() -> str:
    return "r" + uuid.uuid4().hex[:10]


def test_group_member_refused_a_uprobe_but_receives_execs(roles_sensor, as_user, target):
    before = c8probes_lines()
    user = as_user(SUBSCRIBER_UID)
    spec = {"events": {"user_call": [{"executable": target, "symbol": "c8_probe_target", "fetchargs": STEAL_PW}]}}
    refused = user.call("subscribe", spec=spec)
    assert refused["error"] == errors.FORBIDDEN
    assert refused["reason"].startswith(f"uid {SUBSCRIBER_UID} (subscriber) may not place probes: "
                                        f"user_call 'c8_probe_target' in {target} reading memory")
    kernel = user.call("subscribe", spec={"events": {"kernel_call": [{"symbol": "do_sys_openat2"}]}})
    assert kernel["error"] == errors.FORBIDDEN and "kernel_call 'do_sys_openat2'" in kernel["reason"]
    assert c8probes_lines() == before  # nothing was placed
    assert roles_sensor.status()["plan"]["probes"] == {}
    # ...but process events are for every member of the group
    tok = token()
    sub = user.call("subscribe", spec={"events": {"process": {"filter": f'exec_command_line like "*{tok}*"'}}})
    assert "error" not in sub, sub
    got = user.call("exec_and_wait", subscription=sub["subscription"], token=tok)
    assert "error" not in got, got
    assert got["seen"] == [{"pid": got["pid"], "uid": SUBSCRIBER_UID, "command_line": f"/bin/true {tok}"}]


def test_allow_probes_grants_a_uid_its_uprobe(roles_sensor, as_user, target):
    user = as_user(PROBER_UID)
    spec = {"events": {"user_call": [{"executable": target, "symbol": "c8_probe_target", "fetchargs": STEAL_PW}]}}
    sub = user.call("subscribe", spec=spec)
    assert "error" not in sub, sub
    names = [n.replace(":", "/") for n in roles_sensor.status()["plan"]["probes"]]
    assert len(names) == 1
    wait_for(lambda: any(names[0] in ln for ln in c8probes_lines()), 10, what="the granted uprobe placed")
    # it sees its own probe; another subscriber sees none of it
    assert list(user.call("probes")["probes"]) == [n.replace("/", ":") for n in names]
    assert as_user(SUBSCRIBER_UID).call("probes")["probes"] == {}
    assert user.call("unsubscribe", subscription=sub["subscription"]) == {}
    wait_for(lambda: not c8probes_lines(), 15, 0.2, "the uprobe removed with its subscription")


def test_subscriptions_are_their_owners_and_admins_only(roles_sensor, as_user):
    admin = roles_sensor.client
    with admin.subscribe({"events": {"process": {"filter": 'exec_command_line like "*c8-admin-only*"'}}}) as root_sub:
        one, other = as_user(SUBSCRIBER_UID), as_user(OTHER_UID)
        mine = one.call("subscribe", spec={"events": {"file": {"filter": 'filename like "/c8-roles/*"'}}})
        assert "error" not in mine, mine
        sid = mine["subscription"]
        # a subscriber lists and sees its own only; the plan it sees carries no one's filters
        assert one.call("list")["subscriptions"] == [sid]
        st = one.call("status")
        assert st["subscriptions"] == [sid]
        assert all(v == {} for v in st["plan"]["tracepoints"].values()) and st["plan"]["probes"] == {}
        assert other.call("list")["subscriptions"] == []
        # another peer's unsubscribe is refused, the admin's subscription too
        for who, target_sid in ((other, sid), (one, root_sub.id), (other, root_sub.id)):
            refused = who.call("unsubscribe", subscription=target_sid)
            assert refused["error"] == errors.FORBIDDEN, refused
            assert refused["reason"].startswith(f"subscription {target_sid} belongs to another client")
        # root lists all, with specs
        listed = {s["subscription"]: s["spec"] for s in admin.subscriptions()}
        assert listed[sid] == {"events": {"file": {"filter": 'filename like "/c8-roles/*"'}}}
        assert root_sub.id in listed
        assert sid in {s["subscription"] for s in roles_sensor.status()["subscriptions"]}
        # the owner ends its own from another connection (the same uid); nothing else ended
        assert as_user(SUBSCRIBER_UID).call("unsubscribe", subscription=sid) == {}
        live = {s["subscription"] for s in admin.subscriptions()}
        assert sid not in live and root_sub.id in live


def test_admin_ends_anyones_subscription(roles_sensor, as_user):
    user = as_user(SUBSCRIBER_UID)
    sid = user.call("subscribe", spec={"events": {"process": {}}})["subscription"]
    assert roles_sensor.client.unsubscribe(sid)["subscription"] == sid
    assert sid not in {s["subscription"] for s in roles_sensor.client.subscriptions()}


def test_subscriptions_per_peer_are_bounded_for_subscribers(roles_sensor, as_user):
    user = as_user(OTHER_UID)
    made = [user.call("subscribe", spec={"events": {"syscall": {"filter": "id == 999999"}}}) for _ in range(16)]
    assert all("error" not in m for m in made), made
    over = user.call("subscribe", spec={"events": {"syscall": {"filter": "id == 999999"}}})
    assert over["error"] == errors.LIMIT_EXCEEDED
    assert over["reason"] == (f"uid {OTHER_UID} has 16 subscriptions: at most 16 "
                              "(limits.subscriptions_per_peer)")
    # another subscriber is not bound by that peer's count
    other = as_user(SUBSCRIBER_UID).call("subscribe", spec={"events": {"syscall": {"filter": "id == 999999"}}})
    assert "error" not in other
    for m in made:
        assert user.call("unsubscribe", subscription=m["subscription"]) == {}


# -- TCP: the CURVE key's directory is its role ------------------------------------------------
def free_port() -> int:
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def curve_sensor(tmp_path_factory):
    import zmq.auth
    d = tmp_path_factory.mktemp("curve")
    keys = {}
    for name in ("server", "sub", "admin"):
        zmq.auth.create_certificates(str(d), name)
        keys[name] = zmq.auth.load_certificate(str(d / f"{name}.key_secret"))
    for role in ("subscribers", "admins"):
        (d / role).mkdir(mode=0o755)
    (d / "subscribers" / "sub.key").write_text((d / "sub.key").read_text())
    (d / "admins" / "admin.key").write_text((d / "admin.key").read_text())
    port = free_port()
    s = Sensor(tmp_path_factory.mktemp("tcp"), listen_tcp=f"127.0.0.1:{port}",
               curve_server_secret_key_file=str(d / "server.key_secret"),
               curve_authorized_keys_dir=str(d / "subscribers"), curve_admin_keys_dir=str(d / "admins")).start()
    s.keys, s.key_dir = keys, d

    def client(who: str):
        from c8.clients.client import Client
        pub, sec = keys[who]
        return Client(s.run_dir, endpoint=f"tcp://127.0.0.1:{port}", timeout=5.0,
                      curve={"server_public": keys["server"][0], "public": pub, "secret": sec})
    s.tcp = client
    yield s
    s.stop()


def test_curve_keys_carry_their_directory_role(curve_sensor, target):
    sub_client, admin_client = curve_sensor.tcp("sub"), curve_sensor.tcp("admin")
    spec = {"events": {"user_call": [{"executable": target, "symbol": "c8_probe_target", "fetchargs": STEAL_PW}]}}
    with pytest.raises(SensorError) as refused:
        sub_client.subscribe(spec)
    sub_key = curve_sensor.keys["sub"][0].decode()
    assert refused.value.code == errors.FORBIDDEN
    assert refused.value.reason.startswith(f"curve key {sub_key} (subscriber) may not place probes: user_call")
    with sub_client.subscribe({"events": {"process": {"filter": 'exec_command_line like "*c8-tcp-sub*"'}}}) as mine, \
            admin_client.subscribe(spec) as probed:
        # the subscriber key sees its own; the admin key sees both and may end the subscriber's
        assert [s["subscription"] for s in sub_client.subscriptions()] == [mine.id]
        with pytest.raises(SensorError) as other:
            sub_client.unsubscribe(probed.id)
        assert other.value.code == errors.FORBIDDEN
        assert {mine.id, probed.id} <= {s["subscription"] for s in admin_client.subscriptions()}
        assert admin_client.unsubscribe(mine.id)["subscription"] == mine.id


def test_a_revoked_curve_key_is_refused_on_its_next_request(curve_sensor):
    import zmq.auth
    zmq.auth.create_certificates(str(curve_sensor.key_dir), "late")
    pub, sec = zmq.auth.load_certificate(str(curve_sensor.key_dir / "late.key_secret"))
    curve_sensor.keys["late"] = (pub, sec)
    path = curve_sensor.key_dir / "subscribers" / "late.key"
    path.write_text((curve_sensor.key_dir / "late.key").read_text())
    late = curve_sensor.tcp("late")
    assert late.status()["sensor_id"]
    # one connection, kept: the key is checked on every request, not only at the handshake
    from c8.protocol import control
    sock = late._socket()
    try:
        sock.send(control.request("list", {}, 1))
        assert sock.poll(5000) and control.parse_reply(sock.recv())["status"] == "ok"
        path.unlink()
        sock.send(control.request("list", {}, 2))
        assert sock.poll(5000)
        reply = control.parse_reply(sock.recv())
        assert (reply["status"], reply["code"]) == ("error", errors.FORBIDDEN)
        assert reply["reason"] == "this CURVE key is not authorized (any more)"
    finally:
        sock.close()
