"""Name scoper acceptance on the real stack, end to end through host 1's
scoper (TLS) with the stock clients: Debian's docker CLI, docker-compose
1.29 and docker-py.

Tenants write plain names here -- no labels, no scoped names, no
``--pids-limit``, no network of their own: the scoper adds all of that.
tenant-a is alice and carol, tenant-b is bob.  Both tenants own a container
``web`` (httpd serving its volume ``data``, on the tenant's default network
and connected to its network ``backend``); tenant-a also has ``db`` on
``backend``.  Those are made once for the module (``world``) and reused by
the checks that only read them; every check that makes more removes it in
``finally``.  After every test, the two tenants' ``ps -aq`` must not
intersect and must match the engine's own view of each tenant
(``tenants_apart``).
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import os
import pty
import queue
import select
import subprocess
import tarfile
import threading
import time
import uuid
from pathlib import Path

import pytest

from .conftest import Cli, wait_for

T = "org.fiware.fdcs.tenant"
A1, A2, B1, ADMIN = "FDCS_CONFIG_A1", "FDCS_CONFIG_A2", "FDCS_CONFIG_B1", "FDCS_CONFIG_ADMIN"
COMPOSE = "/usr/bin/docker-compose"
NO_SUCH = "No such container"


def uniq(prefix: str = "c") -> str:
    return f"{prefix}{uuid.uuid4().hex[:8]}"


@dataclasses.dataclass
class Tenant:
    key: str  # FDCS_CONFIG_* of its main user
    cli: Cli
    id: str  # Keystone project id
    content: str  # what its web serves
    web: str = ""  # full container id
    backend: str = ""  # network id
    default_net: str = ""  # id of its own default network ("bridge" to it)


@pytest.fixture(scope="module")
def admin(stack) -> Cli:
    """Site administrator, straight on host 1's engine (sees engine names)."""
    return stack.cli(ADMIN)


@pytest.fixture(scope="module")
def alice(stack, scoper) -> Cli:
    return stack.scoper_cli(A1)


@pytest.fixture(scope="module")
def carol(stack, scoper) -> Cli:
    return stack.scoper_cli(A2)


@pytest.fixture(scope="module")
def bob(stack, scoper) -> Cli:
    return stack.scoper_cli(B1)


def _ids(cli: Cli, *args: str) -> list[str]:
    return cli(*args).stdout.split()


def assert_tenants_apart(stack, alice: Cli, carol: Cli, bob: Cli, admin: Cli) -> None:
    """The two tenants' container lists never intersect; carol sees exactly
    alice's; each list is exactly what the engine holds for that tenant."""
    a, c, b = (set(_ids(x, "ps", "-aq")) for x in (alice, carol, bob))
    assert not a & b, f"tenant lists intersect: {a & b}"
    assert a == c, (a, c)
    for ids, tenant in ((a, stack.env["FDCS_TENANT_A"]), (b, stack.env["FDCS_TENANT_B"])):
        assert ids == set(_ids(admin, "ps", "-aq", "--filter", f"label={T}={tenant}")), tenant


@pytest.fixture(autouse=True)
def tenants_apart(stack, alice, carol, bob, admin):
    yield
    assert_tenants_apart(stack, alice, carol, bob, admin)


@pytest.fixture(scope="module")
def world(stack, scoper, alice, bob, admin):
    """Both tenants: network ``backend``, volume ``data``, container ``web``
    (on the default network, then connected to ``backend``); tenant-a also
    ``db`` on ``backend``.  Yields {"a": Tenant, "b": Tenant, "t0": time}."""
    t0 = time.time()
    ts = {"a": Tenant(A1, alice, stack.env["FDCS_TENANT_A"], "content-of-tenant-a"),
          "b": Tenant(B1, bob, stack.env["FDCS_TENANT_B"], "content-of-tenant-b")}
    try:
        for t in ts.values():
            d = t.cli
            t.backend = d("network", "create", "backend").stdout.strip()
            assert d("volume", "create", "data").stdout.strip() == "data"
            t.web = d("run", "-d", "--name", "web", "-v", "data:/data", "busybox", "sh", "-c",
                      f"echo {t.content} > /data/index.html && exec httpd -f -p 80 -h /data").stdout.strip()
            d("network", "connect", "backend", "web")
            t.default_net = d("network", "inspect", "-f", "{{.Id}}", "bridge").stdout.strip()
        alice("run", "-d", "--name", "db", "--network", "backend", "busybox", "sleep", "3600")
        yield {"a": ts["a"], "b": ts["b"], "t0": t0}
    finally:
        for t in ts.values():
            t.cli("rm", "-f", "web", "db", check=False)
            t.cli("network", "rm", "backend", check=False)
            t.cli("volume", "rm", "data", check=False)
        # whatever the scoper failed to remove, and the tenants' default networks
        for t in ts.values():
            for name in ("web", "db"):
                admin("rm", "-f", f"{t.id}_{name}", check=False)
            admin("network", "rm", f"{t.id}_backend", f"{t.id}_bridge", check=False)
            admin("volume", "rm", f"{t.id}_data", check=False)


def _json(cli: Cli, *args: str):
    return json.loads(cli(*args).stdout)


def _lines(cli: Cli, *args: str) -> list[str]:
    return cli(*args).stdout.splitlines()


# -- same names, separate worlds --------------------------------------------------------


def test_each_tenant_sees_only_its_own_under_the_original_names(world, alice, carol, bob):
    a, b = world["a"], world["b"]
    for me, other in ((a, b), (b, a)):
        d = me.cli
        # ps
        rows = _lines(d, "ps", "-a", "--no-trunc", "--format", "{{.ID}}|{{.Names}}|{{.Networks}}|{{.Mounts}}")
        text = "\n".join(rows)
        assert other.web not in text and other.id not in text, text
        row = next(r.split("|") for r in rows if r.startswith(me.web))
        assert row[1] == "web" and set(row[2].split(",")) == {"bridge", "backend"} and row[3] == "data", row
        names = {r.split("|")[1] for r in rows}
        assert names >= ({"web", "db"} if me is a else {"web"}), names
        assert not any("_" in n and n.split("_", 1)[0] in (a.id, b.id) for n in names), names
        # inspect, by name, full id and short id
        for ref in ("web", me.web, me.web[:12]):
            doc = _json(d, "container", "inspect", ref)[0]
            assert doc["Id"] == me.web and doc["Name"] == "/web", (ref, doc["Id"], doc["Name"])
        raw = d("inspect", "web").stdout
        doc = json.loads(raw)[0]
        assert other.id not in raw and other.web not in raw
        assert doc["HostConfig"]["NetworkMode"] == "bridge", doc["HostConfig"]["NetworkMode"]
        assert set(doc["NetworkSettings"]["Networks"]) == {"bridge", "backend"}
        assert doc["NetworkSettings"]["Networks"]["backend"]["NetworkID"] == me.backend
        assert [m.get("Name") for m in doc["Mounts"]] == ["data"]
        # volumes
        assert _lines(d, "volume", "ls", "--format", "{{.Name}}") == ["data"]
        vol = _json(d, "volume", "inspect", "data")[0]
        assert vol["Name"] == "data" and other.id not in json.dumps(vol)
        # networks
        assert sorted(_lines(d, "network", "ls", "--format", "{{.Name}}")) == ["backend", "bridge"]
        net = _json(d, "network", "inspect", "backend")[0]
        assert net["Name"] == "backend" and net["Id"] == me.backend
        members = {c["Name"] for c in net["Containers"].values()}
        assert members == ({"web", "db"} if me is a else {"web"}), members
        assert other.id not in json.dumps(net)
        # stats: the running containers, under their original names
        stats = _lines(d, "stats", "--no-stream", "--format", "{{.ID}}|{{.Name}}")
        assert f"{me.web[:12]}|web" in stats, stats
        assert not any(other.web[:12] in r or other.id in r for r in stats), stats
    # the two tenants' objects are different objects
    assert a.web != b.web and a.backend != b.backend and a.default_net != b.default_net
    va, vb = (_json(t.cli, "volume", "inspect", "data")[0]["Mountpoint"] for t in (a, b))
    assert va != vb
    # carol sees exactly what alice sees
    # (without STATUS, whose "Up N seconds" ticks between two calls, and
    # NETWORKS, whose order varies; both were checked above)
    ps = ["ps", "-a", "--no-trunc", "--format", "{{.ID}} {{.Image}} {{.Command}} {{.Names}} {{.Mounts}}"]
    for args in (ps, ["volume", "ls"], ["network", "ls", "--no-trunc"],
                 ["inspect", "web"], ["network", "inspect", "backend"]):
        assert carol(*args).stdout == alice(*args).stdout, args


def test_events_show_only_the_tenants_own_under_original_names(world):
    a, b = world["a"], world["b"]
    until = f"{time.time():.3f}"
    for me, other in ((a, b), (b, a)):
        out = me.cli("events", "--since", f"{world['t0']:.3f}", "--until", until, "--format", "{{json .}}",
                     timeout=60).stdout
        events = [json.loads(l) for l in out.splitlines() if l.strip()]
        assert other.id not in out and other.web not in out and other.backend not in out, out
        mine = [e for e in events if e.get("Type") == "container" and e["Actor"]["ID"] == me.web]
        assert {"create", "start"} <= {e["Action"] for e in mine}, mine
        assert all(e["Actor"]["Attributes"].get("name") == "web" for e in mine), mine
        for e in events:
            name = e["Actor"].get("Attributes", {}).get("name", "")
            assert not name.startswith((a.id + "_", b.id + "_")), e


# -- another tenant's container ------------------------------------------------------------


VERBS = [["container", "inspect"], ["logs"], ["top"], ["stats", "--no-stream"], ["port"], ["diff"],
         ["export", "-o", "{tmp}/x.tar"], ["cp", "{ref}:/etc/hostname", "{tmp}"], ["cp", "{tmp}/f", "{ref}:/tmp/f2"],
         ["attach", "--no-stdin"], ["exec", "{ref}", "true"], ["wait"], ["update", "--cpu-shares", "512"],
         ["pause"], ["unpause"], ["rename", "{ref}", "stolen"], ["restart", "-t", "0"], ["stop", "-t", "0"],
         ["kill"], ["start"], ["rm", "-f"]]


def test_other_tenant_is_refused_every_verb_by_id_with_no_such_container(world, tmp_path):
    a, b = world["a"], world["b"]
    alice, bob = a.cli, b.cli
    (tmp_path / "f").write_text("x")
    state = "{{.State.StartedAt}} {{.Name}} {{.State.Running}} {{.State.Paused}}"
    before = alice("inspect", "-f", state, a.web).stdout
    problems = []
    for ref in (a.web, a.web[:12]):
        for verb in VERBS:
            args = [x.format(ref=ref, tmp=tmp_path) for x in verb]
            if not any("{ref}" in x for x in verb):
                args.append(ref)
            p = bob(*args, check=False, timeout=60)
            # (rm -f exits 0 on a missing container, against the engine too)
            failed = p.returncode != 0 or verb == ["rm", "-f"]
            if not failed or NO_SUCH not in p.stderr or "authorization denied" in p.stderr:
                problems.append(f"docker {' '.join(args)} -> rc={p.returncode} {p.stderr.strip()!r}")
        # the untyped inspect moves on to images, networks, volumes after the 404
        p = bob("inspect", ref, check=False)
        if p.returncode == 0 or "No such object" not in p.stderr:
            problems.append(f"docker inspect {ref} -> rc={p.returncode} {p.stderr.strip()!r}")
    assert not problems, "\n".join(problems)
    assert alice("inspect", "-f", state, a.web).stdout == before and before.split()[-2:] == ["true", "false"]
    # by name, bob gets his own web
    assert bob("container", "inspect", "-f", "{{.Id}}", "web").stdout.strip() == b.web
    assert bob("exec", "web", "cat", "/data/index.html").stdout.strip() == b.content
    # positive controls: alice may, by id and short id
    for ref in (a.web, a.web[:12]):
        assert alice("exec", ref, "cat", "/data/index.html").stdout.strip() == a.content
        alice("top", ref)
        alice("cp", f"{ref}:/etc/hostname", str(tmp_path / "h"))


def _refused(cli: Cli, *args: str, match: str) -> str | None:
    """None if ``docker args`` fails saying ``match`` (and does not fall back
    to pulling the image), else what went wrong."""
    p = cli(*args, check=False)
    if p.returncode != 0 and match in p.stderr and "Unable to find image" not in p.stderr:
        return None
    return f"docker {' '.join(args)} -> rc={p.returncode} {p.stderr.strip()!r}"


def test_links_volumes_from_container_network_and_connect_within_a_tenant_only(world):
    a, b = world["a"], world["b"]
    alice, bob = a.cli, b.cli
    probe = uniq("probe")
    try:
        # within tenant-a, by name: link (with an alias), --volumes-from,
        # --network container:, network connect / disconnect
        assert alice("run", "--rm", "--link", "web:w", "busybox", "wget", "-qO-", "http://w/").stdout.strip() == a.content
        out = alice("run", "--rm", "--volumes-from", "web", "busybox", "cat", "/data/index.html").stdout
        assert out.strip() == a.content
        out = alice("run", "--rm", "--network", "container:web", "busybox", "wget", "-qO-", "http://127.0.0.1/").stdout
        assert out.strip() == a.content
        alice("run", "-d", "--name", probe, "busybox", "sleep", "600")
        alice("network", "connect", "backend", probe)
        assert set(_json(alice, "inspect", probe)[0]["NetworkSettings"]["Networks"]) == {"bridge", "backend"}
        alice("network", "disconnect", "backend", probe)
        # across tenants, by id: each refused as missing
        problems = [
            _refused(bob, "run", "--rm", "--link", f"{a.web}:w", "busybox", "true", match=NO_SUCH),
            _refused(bob, "run", "--rm", "--volumes-from", a.web, "busybox", "true", match=NO_SUCH),
            _refused(bob, "run", "--rm", "--network", f"container:{a.web}", "busybox", "true", match=NO_SUCH),
            _refused(bob, "network", "connect", "backend", a.web, match=NO_SUCH),
            _refused(bob, "network", "connect", a.backend, "web", match="not found"),
        ]
        assert not [x for x in problems if x], "\n".join(x for x in problems if x)
        # nothing changed on either side
        assert set(_json(alice, "inspect", "web")[0]["NetworkSettings"]["Networks"]) == {"bridge", "backend"}
        assert set(_json(bob, "inspect", "web")[0]["NetworkSettings"]["Networks"]) == {"bridge", "backend"}
    finally:
        alice("rm", "-f", probe, check=False)


def test_the_two_data_volumes_keep_separate_contents(world):
    a, b = world["a"], world["b"]
    mark = uniq("only-a-")
    try:
        a.cli("run", "--rm", "-v", "data:/d", "busybox", "touch", f"/d/{mark}")
        for t in (a, b):
            out = t.cli("run", "--rm", "-v", "data:/d", "busybox", "sh", "-c", "cat /d/index.html; ls /d").stdout
            assert out.splitlines()[0] == t.content, out
            assert (mark in out) == (t is a), out
    finally:
        a.cli("run", "--rm", "-v", "data:/d", "busybox", "rm", "-f", f"/d/{mark}", check=False)


def test_tenant_networks_resolve_original_names_and_stay_apart(world):
    a, b = world["a"], world["b"]
    alice, bob = a.cli, b.cli
    # on a tenant network, containers reach each other by original name
    out = alice("run", "--rm", "--network", "backend", "busybox", "sh", "-c",
                "ping -c1 -W2 web >/dev/null && ping -c1 -W2 db >/dev/null && wget -qO- http://web/").stdout
    assert out.strip() == a.content
    # bob's same-named network resolves his own web, and not alice's db (a
    # name the engine's DNS does not know goes upstream, which this host's
    # namespaces cannot reach: a 1 s resolver timeout keeps that short)
    out = bob("run", "--rm", "--network", "backend", "--dns-option", "timeout:1", "--dns-option", "attempts:1",
              "busybox", "sh", "-c",
              "wget -qO- http://web/; if ping -c1 -W1 db >/dev/null 2>&1; then echo DB-FOUND; else echo DB-UNKNOWN; fi")
    assert out.stdout.split() == [b.content, "DB-UNKNOWN"], (out.stdout, out.stderr)
    # by address: alice's default-network container is reachable by alice only.
    # (Debian's busybox-static wget crashes with -T, so the timeout applet
    # bounds it; not as PID 1, which ignores TERM.)
    ip = _json(alice, "inspect", "web")[0]["NetworkSettings"]["Networks"]["bridge"]["IPAddress"]
    assert ip
    probe = f"ping -c1 -W2 {ip} >/dev/null && echo PING-OK; timeout 3 wget -qO- http://{ip}/; exit 0"
    assert alice("run", "--rm", "busybox", "sh", "-c", probe).stdout.split() == ["PING-OK", a.content]
    out = bob("run", "--rm", "busybox", "sh", "-c", probe).stdout
    assert "PING-OK" not in out and a.content not in out, out


# -- streams -------------------------------------------------------------------------------


def _run_in_pty(argv: list[str], env: dict | None, send: str, prompt: str, timeout: float = 60) -> tuple[int, str]:
    """Run ``argv`` with a pseudo-terminal as its stdin/stdout/stderr; once
    ``prompt`` appears, type ``send``; return (exit status, everything printed)."""
    master, slave = pty.openpty()
    proc = subprocess.Popen(argv, stdin=slave, stdout=slave, stderr=slave, env=env, start_new_session=True)
    os.close(slave)
    out, sent = b"", False
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            r, _, _ = select.select([master], [], [], 0.2)
            if r:
                try:
                    chunk = os.read(master, 4096)
                except OSError:  # EIO: every holder of the terminal is gone
                    break
                if not chunk:
                    break
                out += chunk
            if not sent and prompt.encode() in out:
                os.write(master, send.encode())
                sent = True
        return proc.wait(timeout=max(1.0, deadline - time.monotonic())), out.decode(errors="replace")
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        os.close(master)


def test_stdin_pipes_and_a_terminal(world, stack):
    alice = world["a"].cli
    assert alice("run", "-i", "--rm", "busybox", "cat", input="x\n").stdout == "x\n"
    assert alice("exec", "-i", "web", "cat", input="y\n").stdout == "y\n"
    big = os.urandom(3 * 1024 * 1024)  # more than one window of the stream, both ways
    p = alice("run", "-i", "--rm", "busybox", "sha256sum", input=big, timeout=120)
    assert p.stdout.split()[0].decode() == hashlib.sha256(big).hexdigest()
    # -it under a terminal: an interactive shell, its exit status passed back
    rc, out = _run_in_pty(alice.argv("run", "-it", "--rm", "busybox", "sh"), alice.env,
                          "echo hi-$((6*7)); tty; exit 3\r", prompt="# ")
    assert rc == 3 and "hi-42" in out and "/dev/pts/" in out, (rc, out)
    rc, out = _run_in_pty(alice.argv("exec", "-it", "web", "sh"), alice.env, "echo via-$((2+3)); exit\r", prompt="# ")
    assert rc == 0 and "via-5" in out, (rc, out)


def test_attach_and_logs_follow(world):
    alice = world["a"].cli
    cids = []
    try:
        # attach: the container prints only what it reads through the attach
        # (stdin stays open until the answer is read: the CLI stops copying
        # output once its stdin ends, even against the engine itself)
        cid = alice("run", "-d", "-i", "busybox", "sh", "-c", "read l; echo got:$l").stdout.strip()
        cids.append(cid)
        proc = alice.popen("attach", cid, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                           text=True)
        try:
            proc.stdin.write("hello\n")
            proc.stdin.flush()
            got: queue.Queue = queue.Queue()
            threading.Thread(target=lambda: got.put(proc.stdout.readline()), daemon=True).start()
            assert got.get(timeout=30) == "got:hello\n"
            assert proc.wait(timeout=30) == 0, proc.stderr.read()
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        assert alice("inspect", "-f", "{{.State.ExitCode}}", cid).stdout.strip() == "0"

        # logs -f streams as it comes, and ends when the container exits
        cid = alice("run", "-d", "busybox", "sh", "-c",
                    "echo start; while [ ! -e /tmp/go ]; do sleep 0.1; done; echo end").stdout.strip()
        cids.append(cid)
        proc = alice.popen("logs", "-f", cid, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        lines: queue.Queue = queue.Queue()
        threading.Thread(target=lambda: [lines.put(l) for l in proc.stdout] + [lines.put(None)], daemon=True).start()
        try:
            assert lines.get(timeout=30) == "start\n"
            alice("exec", cid, "touch", "/tmp/go")
            assert proc.wait(timeout=30) == 0, proc.stderr.read()
            assert lines.get(timeout=10) == "end\n"
            assert lines.get(timeout=10) is None
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    finally:
        for cid in cids:
            alice("rm", "-f", cid, check=False)


def test_cp_of_64_mib_both_ways_and_export(world, tmp_path):
    alice = world["a"].cli
    src = tmp_path / "big.bin"
    with open(src, "wb") as f:
        for _ in range(64):
            f.write(os.urandom(1024 * 1024))
    digest = hashlib.sha256(src.read_bytes()).hexdigest()
    try:
        alice("cp", str(src), "web:/tmp/big.bin", timeout=180)
        assert alice("exec", "web", "sha256sum", "/tmp/big.bin").stdout.split()[0] == digest
        out = tmp_path / "out"
        out.mkdir()
        alice("cp", "web:/tmp/big.bin", str(out), timeout=180)
        assert hashlib.sha256((out / "big.bin").read_bytes()).hexdigest() == digest
        (out / "big.bin").unlink()
        alice("exec", "web", "rm", "/tmp/big.bin")
        # export, to a file and as a stream
        alice("exec", "web", "sh", "-c", "echo exported > /tmp/mark")
        alice("export", "-o", str(tmp_path / "web.tar"), "web", timeout=180)
        with tarfile.open(tmp_path / "web.tar") as tar:
            names = tar.getnames()
            assert {"bin/busybox", "tmp/mark"} <= set(names)
            assert tar.extractfile("tmp/mark").read() == b"exported\n"
        p = alice("export", "web", input=b"", timeout=180)
        with tarfile.open(fileobj=io.BytesIO(p.stdout)) as tar:
            assert tar.getnames() == names
    finally:
        alice("exec", "web", "rm", "-f", "/tmp/big.bin", "/tmp/mark", check=False)


# -- docker-compose and docker-py --------------------------------------------------------------

COMPOSE_FILE = """\
version: "2.4"
services:
  server:
    image: busybox
    command: sh -c "echo ${FDCS_MARK} > /www/index.html && exec httpd -f -p 80 -h /www"
    volumes: ["www:/www"]
  client:
    image: busybox
    depends_on: [server]
    command: sh -c "until ping -c1 -W1 server >/dev/null; do sleep 0.2; done; echo PING-OK; until wget -qO- http://server/; do sleep 0.2; done; exec sleep 3600"
volumes:
  www: {}
"""


def _compose(stack, user: str, workdir: Path, *args: str, mark: str = "", check: bool = True,
             cert_path=None, timeout: float = 180) -> subprocess.CompletedProcess:
    env = stack.client_env(user, cert_path=cert_path)
    env["FDCS_MARK"] = mark
    p = subprocess.run([COMPOSE, "--ansi", "never", "-f", str(workdir / "docker-compose.yml"), "-p", "fdcsapp", *args],
                       capture_output=True, text=True, env=env, cwd=workdir, timeout=timeout)
    if check:
        assert p.returncode == 0, f"docker-compose {' '.join(args)} ({user}) failed: {p.stderr}"
    return p


def test_compose_same_project_name_in_both_tenants(world, stack, tmp_path):
    (tmp_path / "docker-compose.yml").write_text(COMPOSE_FILE)
    a, b = world["a"], world["b"]
    users = {A1: (a, uniq("mark-a-")), B1: (b, uniq("mark-b-"))}
    try:
        for user, (t, mark) in users.items():
            _compose(stack, user, tmp_path, "up", "-d", mark=mark)
        for user, (t, mark) in users.items():
            ps = _compose(stack, user, tmp_path, "ps").stdout
            rows = {l.split()[0]: l for l in ps.splitlines() if l.startswith("fdcsapp_")}
            assert set(rows) == {"fdcsapp_server_1", "fdcsapp_client_1"}, ps
            assert all(" Up " in r or r.rstrip().endswith("Up") for r in rows.values()), ps

            def reached():
                logs = _compose(stack, user, tmp_path, "logs", "--no-color", "client").stdout
                return "PING-OK" in logs and mark in logs and logs
            logs = wait_for(reached, timeout=60, what=f"the client of {user} to reach its server")
            other_mark = next(m for u, (_, m) in users.items() if u != user)
            assert other_mark not in logs
            names = set(_lines(t.cli, "ps", "--format", "{{.Names}}"))
            assert {"fdcsapp_server_1", "fdcsapp_client_1"} <= names, names
            assert "fdcsapp_www" in _lines(t.cli, "volume", "ls", "--format", "{{.Name}}")
            assert "fdcsapp_default" in _lines(t.cli, "network", "ls", "--format", "{{.Name}}")
        for user, (t, _) in users.items():
            _compose(stack, user, tmp_path, "down", "-v", "-t", "1")
            assert not [n for n in _lines(t.cli, "ps", "-a", "--format", "{{.Names}}") if n.startswith("fdcsapp_")]
            assert "fdcsapp_www" not in _lines(t.cli, "volume", "ls", "--format", "{{.Name}}")
            assert "fdcsapp_default" not in _lines(t.cli, "network", "ls", "--format", "{{.Name}}")
    finally:
        for user, (t, _) in users.items():
            _compose(stack, user, tmp_path, "down", "-v", "-t", "0", check=False)


def _docker_py(stack, user: str, monkeypatch, cert_path=None, from_env: bool = False):
    import docker

    env = stack.client_env(user, cert_path=cert_path, ca_bundle=not from_env)
    for k in ("DOCKER_HOST", "DOCKER_TLS_VERIFY", "DOCKER_CERT_PATH", "REQUESTS_CA_BUNDLE", "CURL_CA_BUNDLE"):
        monkeypatch.delenv(k, raising=False)
    # docker-py reads HttpHeaders from DOCKER_CONFIG when the client is made
    monkeypatch.setenv("DOCKER_CONFIG", env["DOCKER_CONFIG"])
    if from_env:
        return docker.from_env(environment=env)
    for k in ("REQUESTS_CA_BUNDLE", "CURL_CA_BUNDLE"):
        monkeypatch.setenv(k, env[k])
    certs = Path(env["DOCKER_CERT_PATH"])
    tls = docker.tls.TLSConfig(ca_cert=str(certs / "ca.pem"),
                               client_cert=(str(certs / "cert.pem"), str(certs / "key.pem")), verify=True)
    return docker.DockerClient(base_url=env["DOCKER_HOST"], tls=tls)


def test_docker_py_create_list_inspect_logs_remove(world, stack, monkeypatch):
    import docker

    a, b = world["a"], world["b"]
    alice = _docker_py(stack, A1, monkeypatch)
    bob = _docker_py(stack, B1, monkeypatch)
    name = uniq("py")
    c = None
    try:
        c = alice.containers.run("busybox", ["sh", "-c", "echo hello-from-py"], name=name, detach=True)
        assert c.wait(timeout=60)["StatusCode"] == 0
        assert c.logs() == b"hello-from-py\n"
        listed = {x.id: x.name for x in alice.containers.list(all=True)}
        assert listed.get(c.id) == name and listed.get(a.web) == "web" and b.web not in listed, listed
        got = alice.containers.get(name)
        assert got.id == c.id and got.attrs["Name"] == f"/{name}" and got.name == name
        assert alice.containers.get("web").id == a.web
        assert {n.name for n in alice.networks.list()} == {"bridge", "backend"}
        assert "data" in {v.name for v in alice.volumes.list()}
        # bob: his own web by name; alice's container by id is missing (404)
        assert bob.containers.get("web").id == b.web
        assert c.id not in {x.id for x in bob.containers.list(all=True)}
        for ref in (c.id, name, a.web):
            with pytest.raises(docker.errors.NotFound):
                bob.containers.get(ref)
        c.remove()
        with pytest.raises(docker.errors.NotFound):
            alice.containers.get(name)
        c = None
    finally:
        if c is not None:
            c.remove(force=True)
        alice.close()
        bob.close()


# -- refusals, login, defaults ---------------------------------------------------------------


def test_plugin_refusals_reach_the_cli_intact(world):
    alice = world["a"].cli
    alice("run", "--rm", "busybox", "true")  # positive control
    for flags, msg in ((["--privileged"], "HostConfig.Privileged is not allowed"),
                       (["-v", "/:/host"], "host path"),
                       (["--pids-limit", "100000"], "HostConfig.PidsLimit")):
        err = alice.fails("run", "--rm", *flags, "busybox", "true", match=msg)
        assert "Unable to find image" not in err, err


def test_config_dir_written_by_fdcs_login_serves_cli_docker_py_and_compose(world, stack, tmp_path, monkeypatch):
    a = world["a"]
    cfg = tmp_path / "fdcs"
    p = subprocess.run(["fdcs-login", "--os-auth-url", stack.env["FDCS_KEYSTONE_URL"], "--os-username", "carol",
                        "--os-project-name", "tenant-a", "--password-stdin", "--config", str(cfg),
                        "--ca", str(stack.certs / "ca.pem")],
                       input=stack.env["FDCS_PASSWORD"] + "\n", capture_output=True, text=True, timeout=60,
                       env={k: v for k, v in os.environ.items() if not k.startswith("OS_")})
    assert p.returncode == 0, p.stderr
    assert {"config.json", "ca.pem", "cert.pem", "key.pem"} <= {f.name for f in cfg.iterdir()}
    # the CLI: DOCKER_TLS_VERIFY and DOCKER_CERT_PATH alone, no --tls flags
    env = stack.client_env(str(cfg), cert_path=cfg, ca_bundle=False)
    cli = Cli(str(cfg), stack.env["FDCS_DOCKER_HOST"], env=env)
    assert cli("ps", "--no-trunc", "--format", "{{.ID}} {{.Names}}").stdout.splitlines().count(f"{a.web} web") == 1
    # docker-py from the same environment
    client = _docker_py(stack, str(cfg), monkeypatch, cert_path=cfg, from_env=True)
    try:
        assert client.containers.get("web").id == a.web
    finally:
        client.close()
    # docker-compose
    (tmp_path / "docker-compose.yml").write_text(COMPOSE_FILE)
    out = _compose(stack, str(cfg), tmp_path, "ps", cert_path=cfg).stdout
    assert "Name" in out
    # negative control: a config dir without the stack's CA is not trusted
    other = tmp_path / "other"
    other.mkdir()
    for f in ("cert.pem", "key.pem", "config.json"):
        (other / f).write_bytes((cfg / f).read_bytes())
    (other / "ca.pem").write_bytes((cfg / "cert.pem").read_bytes())  # not a CA of the scoper's certificate
    bad = Cli(str(other), stack.env["FDCS_DOCKER_HOST"], env=stack.client_env(str(other), cert_path=other))
    assert bad("ps", check=False).returncode != 0


def test_info_networks_and_the_default_network(world, stack, admin):
    a, b = world["a"], world["b"]
    for t in (a, b):
        info = _json(t.cli, "info", "--format", "{{json .}}")
        every, running = _ids(t.cli, "ps", "-aq"), _ids(t.cli, "ps", "-q")
        assert (info["Containers"], info["ContainersRunning"]) == (len(every), len(running)), info
        assert info["ContainersStopped"] + info["ContainersPaused"] == len(every) - len(running)
    engine = _json(admin, "info", "--format", "{{json .}}")
    assert engine["Containers"] >= len(_ids(a.cli, "ps", "-aq")) + len(_ids(b.cli, "ps", "-aq"))
    # network ls: the tenant's own bridge and its networks only
    for t in (a, b):
        nets = {l.split()[0]: l.split()[1] for l in _lines(t.cli, "network", "ls", "--no-trunc", "--format",
                                                             "{{.Name}} {{.ID}}")}
        assert nets == {"bridge": t.default_net, "backend": t.backend}, nets
    # --network host refused, none allowed
    a.cli("run", "--rm", "busybox", "true")  # positive control
    a.cli.fails("run", "--rm", "--network", "host", "busybox", "true", match="host")
    links = a.cli("run", "--rm", "--network", "none", "busybox", "ip", "-o", "link").stdout
    assert [l.split(":")[1].strip() for l in links.splitlines()] == ["lo"], links
    # a default-network container is on the tenant's own bridge, never on docker0
    docker0 = _json(admin, "network", "inspect", "bridge")[0]
    for t in (a, b):
        doc = _json(admin, "inspect", t.web)[0]
        assert doc["HostConfig"]["NetworkMode"] == f"{t.id}_bridge"
        assert set(doc["NetworkSettings"]["Networks"]) == {f"{t.id}_bridge", f"{t.id}_backend"}
        assert doc["NetworkSettings"]["Networks"][f"{t.id}_bridge"]["NetworkID"] == t.default_net
        assert t.default_net != docker0["Id"] and t.web not in docker0.get("Containers", {})
        own = _json(admin, "network", "inspect", t.default_net)[0]
        assert own["Name"] == f"{t.id}_bridge" and own["Labels"].get(T) == t.id and t.web in own["Containers"]


def test_a_pruned_default_network_is_made_again_at_once(stack, scoper, admin):
    """``network prune`` removes the tenant's unused default network; the
    next ``run`` must get a new one (not a stale "network bridge not found").
    A tenant of its own, so that no container of the shared ones pins it."""
    out = stack.cmd("tenant", "add", "tenant-prune").stdout.split()
    project, config = out[0], out[1]
    cli = stack.scoper_cli(config)
    try:
        cli("run", "--rm", "busybox", "true")
        assert _lines(cli, "network", "ls", "--format", "{{.Name}}") == ["bridge"]
        assert "bridge" in cli("network", "prune", "-f").stdout
        assert _lines(cli, "network", "ls", "--format", "{{.Name}}") == []
        p = cli("run", "--rm", "busybox", "true", check=False)
        assert p.returncode == 0, p.stderr
        assert _lines(cli, "network", "ls", "--format", "{{.Name}}") == ["bridge"]
    finally:
        for cid in _ids(admin, "ps", "-aq", "--filter", f"label={T}={project}"):
            admin("rm", "-f", cid, check=False)
        admin("network", "rm", f"{project}_bridge", check=False)
