"""Security corpus, part 2: the control plane out of tenants' reach (issue 7).

From inside a tenant container (busybox on the tenant's own network), none
of the stack's control plane answers: Redis, Keystone, the name scopers'
ports, the metrics ports, the conventional engine TCP ports -- on any
address of the machine (its root namespace) or of the engine's namespace
(the bridge gateways, the tenant's own gateway included) -- and neither the
engine's nor the plugin's unix socket is visible in the container.

Positive controls, in the same probe script and with the same probe
function: the container reaches a listener in another container of the same
tenant, and a listener this test starts in the engine's namespace on all
addresses (what a control-plane daemon exposed there would be) -- so the
probe does see the host side; and from this test process each control-plane
port does answer (so "unreachable" never just means "not running").

Runs for a container made through the scoper (on the tenant's default
network, which the scoper makes) and for one made on the engine socket
(plugin alone: on a network the tenant made itself, scoped name, label and
pids limit written by hand).
"""

from __future__ import annotations

import json
import re
import socket
import subprocess
import sys

import pytest

from authz_plugin.devstack._stack import Stack as DevStack

from .test_transport import A1, ADMIN, MODES, T, uniq

#: ports an engine conventionally listens on (none here: dockerd has only its unix socket)
ENGINE_TCP = (2375, 2376)
#: the metrics listeners' default ports (authz_plugin.config), in case a stack keeps them
METRICS_DEFAULTS = (9464, 9465, 9466)

PROBE = r"""
probe() {  # probe ADDR PORT: "OPEN ADDR:PORT" unless the connection fails
  r=$(timeout 5 nc -w 2 "$1" "$2" </dev/null 2>&1 >/dev/null)
  case "$r" in *"can't connect"*|*"timed out"*|*"unreachable"*|*"refused"*) ;; *) echo "OPEN $1:$2";; esac
}
gw=$(ip route | awk '/^default/ {print $3}')
echo "GATEWAY $gw"
echo "CONTROL $(timeout 5 nc -w 2 {srv} 8080 </dev/null)"
probe {srv} 8080
probe "$gw" {calibration}
# all at once: an address that drops (or rate-limits its ICMP) costs 2 s, once
for a in {addrs} $gw; do
  for p in {ports}; do probe "$a" "$p" & done
done
wait
for f in {paths}; do [ -e "$f" ] && echo "PATH $f"; done
find / -xdev -type s 2>/dev/null | sed 's/^/SOCKET /'
echo DONE
"""


def _ipv4(argv: list[str]) -> set[str]:
    out = subprocess.run(argv + ["ip", "-4", "-o", "addr", "show"], capture_output=True, text=True,
                         check=True).stdout
    return set(re.findall(r"inet (\d+\.\d+\.\d+\.\d+)/", out))


def _port(url: str) -> int:
    return int(re.search(r":(\d+)(?:/|$)", url).group(1))


def control_plane(stack) -> dict[str, int]:
    """name -> port of every TCP listener of the stack (and the usual engine
    and metrics ports, listening or not)."""
    env = stack.env
    ports = {"redis": _port(env["FDCS_REDIS_URL"]), "keystone": _port(env["FDCS_KEYSTONE_URL"])}
    for i, host in enumerate(env["FDCS_DOCKER_HOSTS"].split(), 1):
        if host.startswith("tcp://"):
            ports[f"scoper-h{i}"] = _port(host)
    for key, value in env.items():
        if "METRICS" in key and re.search(r":\d+", value):
            ports[key.lower()] = _port(value)
    for p in METRICS_DEFAULTS:
        ports.setdefault(f"metrics-default-{p}", p)
    for p in ENGINE_TCP:
        ports[f"engine-tcp-{p}"] = p
    return ports


#: a listener on every address of the namespace it runs in; prints its port.
#: Its port is never one of the probed ports (argv): it answers on every
#: address of the engine's namespace, so a kernel-chosen port that happened
#: to equal, say, a metrics port of the root namespace would read as a leak.
LISTENER = """
import socket, sys
avoid = {int(p) for p in sys.argv[1:]}
while True:
    s = socket.socket()
    s.bind(("0.0.0.0", 0))
    if s.getsockname()[1] not in avoid:
        break
    s.close()
s.listen()
print(s.getsockname()[1], flush=True)
while True:
    c, _ = s.accept()
    c.sendall(b"host side\\n")
    c.close()
"""


def _listening(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=2).close()
        return True
    except OSError:
        return False


@pytest.fixture(params=MODES)
def tenant_box(request, stack, scoper):
    """(mode, run): ``run(name, *cmd, detach=False)`` runs busybox as alice on
    her tenant's network, in the mode's way; everything made is removed."""
    mode = request.param
    ta = stack.env["FDCS_TENANT_A"]
    admin = stack.cli(ADMIN)
    made: list[str] = []
    net = f"{ta}_{uniq('cpnet-')}"
    if mode == "scoper":
        alice = stack.scoper_cli(A1)

        def run(name, *cmd, detach=False):
            made.append(f"{ta}_{name}")
            return alice("run", "-d" if detach else "--rm", "--name", name, "busybox", *cmd, timeout=180)
    else:
        alice = stack.cli(A1)
        alice("network", "create", "--label", f"{T}={ta}", net)

        def run(name, *cmd, detach=False):
            made.append(f"{ta}_{name}")
            return alice("run", "-d" if detach else "--rm", "--name", f"{ta}_{name}", "--label", f"{T}={ta}",
                         "--network", net, "--pids-limit", "512", "--cgroupns", "private", "busybox", *cmd,
                         timeout=180)
    try:
        yield mode, run
    finally:
        if made:
            admin("rm", "-f", *made, check=False)
        if mode == "plugin":
            admin("network", "rm", net, check=False)


def test_a_tenant_container_reaches_its_tenant_and_no_control_plane(stack, tenant_box):
    mode, run = tenant_box
    ports = control_plane(stack)
    # control: what is listening answers this process (root namespace, loopback)
    for name in ("redis", "keystone", *(k for k in ports if k.startswith("scoper-"))):
        assert _listening(ports[name]), f"{name} is not listening on 127.0.0.1:{ports[name]}"

    mark = uniq("reached-")
    srv = uniq("srv-")
    run(srv, "nc", "-ll", "-p", "8080", "-e", "echo", mark, detach=True)
    ta = stack.env["FDCS_TENANT_A"]
    nets = json.loads(stack.cli(ADMIN)("inspect", f"{ta}_{srv}").stdout)[0]["NetworkSettings"]["Networks"]
    srv_ip = next(n["IPAddress"] for n in nets.values() if n["IPAddress"])

    # every address of the machine's root namespace and of the engine's
    # (its bridges' gateways, the tenant network's now included)
    engine_pid = DevStack(stack.dir).pid("engine-h1")
    addrs = _ipv4([]) | _ipv4(["nsenter", "-t", str(engine_pid), "-n"])
    assert "127.0.0.1" in addrs and len(addrs) >= 3, addrs
    listener = subprocess.Popen(["nsenter", "-t", str(engine_pid), "-n", sys.executable, "-c", LISTENER,
                                 *map(str, sorted(set(ports.values())))], stdout=subprocess.PIPE, text=True)
    try:
        calibration = int(listener.stdout.readline())
        out = _probe(stack, run, srv_ip, addrs, ports, calibration)
    finally:
        listener.kill()
        listener.wait()

    lines = out.splitlines()
    assert lines[-1] == "DONE", out

    # positive controls: the same tenant's listener answers, to the same
    # probe; so does the one in the engine's namespace, on the gateway
    assert f"CONTROL {mark}" in lines, out
    assert f"OPEN {srv_ip}:8080" in lines, out
    gateway = next(line.split()[1] for line in lines if line.startswith("GATEWAY "))
    assert re.fullmatch(r"\d+\.\d+\.\d+\.\d+", gateway) and gateway in addrs, (gateway, addrs)
    assert f"OPEN {gateway}:{calibration}" in lines, out

    # nothing else: no control-plane port on any address, no socket, no engine path
    leaks = [line for line in lines if line.startswith(("OPEN", "PATH", "SOCKET"))
             and line not in (f"OPEN {srv_ip}:8080", f"OPEN {gateway}:{calibration}")]
    assert not leaks, f"{mode}: a tenant container reaches the control plane: {leaks}\n{ports}"


def _probe(stack, run, srv_ip: str, addrs: set[str], ports: dict[str, int], calibration: int) -> str:
    """The probe script's output, from a fresh container of the mode."""
    paths = ["/run/docker.sock", "/var/run/docker.sock", "/run/docker", "/run/docker/plugins",
             *(h.removeprefix("unix://") for h in stack.env["FDCS_ENGINE_HOSTS"].split()), str(stack.dir)]
    script = (PROBE.replace("{srv}", srv_ip).replace("{addrs}", " ".join(sorted(addrs)))
              .replace("{ports}", " ".join(str(p) for p in sorted(set(ports.values()))))
              .replace("{paths}", " ".join(paths)).replace("{calibration}", str(calibration)))
    return run(uniq("probe-"), "sh", "-c", script).stdout
