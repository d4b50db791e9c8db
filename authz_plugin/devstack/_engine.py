"""The simulated hosts' engines: dockerd in a network namespace each.

Facts this module relies on (DEVSTACK.md, and seen here):

* ``nsenter --net=/run/netns/NS dockerd ...`` runs dockerd in NS (``ip netns
  exec`` does not: it remounts /sys).  nsenter execs dockerd, so the pid we
  start is dockerd's.  dockerd starts its own containerd (state under its
  exec-root); each engine has its own docker0, bridges and iptables rules.
* Every API call needs the plugin's consent, so the stack's own calls carry
  the break-glass admin key header.
* Stopping: on TERM dockerd stops its containers (waiting up to 10 s for each
  that ignores TERM, as ``httpd -f`` as PID 1 does), then its containerd.
  We send TERM and at once KILL the containers' init processes (found in
  containerd's bundles under the exec-root), so a stop takes about 3 s,
  most of it dockerd polling its containerd once a second.  Whatever
  survives (a dockerd killed -9 leaves containerd, shims and containers
  running) is found through this engine's own paths, never by name:
  containerd by its pid file, shims by their ``-address`` argument naming
  this engine's containerd socket, container processes by their cgroups.
"""

from __future__ import annotations

import io
import os
import re
import signal
import socket
import tarfile
import time
from pathlib import Path
from typing import Mapping

from ._procs import Commands, proc_alive, signal_pid, terminate, unix_http, wait_gone
from ._state import Host, Layout

DOCKERD = "/usr/sbin/dockerd"
# Debian's CLI; /usr/local/bin/docker may be an unrelated client earlier in PATH
DOCKER = "/usr/bin/docker"
NSENTER = "/usr/bin/nsenter"
IP = "/usr/sbin/ip"
UMOUNT = "/usr/bin/umount"
BUSYBOX = "/bin/busybox"

#: the engine's log limits; the plugin's policy.log_max_size must allow them
LOG_MAX_SIZE = "10m"
LOG_MAX_FILE = "3"
#: tenant networks (one default bridge per tenant): 256 /24s per engine.
#: Every engine has its own namespace, so they may all use the same pool.
ADDRESS_POOL = "base=10.200.0.0/16,size=24"
IMAGE = "busybox:latest"
#: the engine's API version (docker.io 20.10); the plugin refuses
#: unversioned paths other than the CLI's ``/_ping``
API = "/v1.41"


def component(host: Host) -> str:
    return f"engine-{host.suffix}"


# -- network namespace -----------------------------------------------------------


def ensure_netns(host: Host, cmds: Commands) -> bool:
    """Create the host's namespace with lo up, unless it exists; True if made."""
    if host.netns_path.exists():
        return False
    cmds.run(component(host), [IP, "netns", "add", host.name])
    cmds.run(component(host), [IP, "-n", host.name, "link", "set", "lo", "up"])
    return True


def delete_netns(host: Host, cmds: Commands) -> None:
    if host.netns_path.exists():
        cmds.run(component(host), [IP, "netns", "delete", host.name])


# -- dockerd ---------------------------------------------------------------------


def dockerd_argv(host: Host) -> list[str]:
    return [
        NSENTER, f"--net={host.netns_path}",
        DOCKERD,
        "--data-root", str(host.data_root),
        "--exec-root", str(host.exec_root),
        "--pidfile", str(host.dockerd_pidfile),
        "--host", f"unix://{host.engine_socket}",
        "--authorization-plugin", host.plugin_name,
        "--log-opt", f"max-size={LOG_MAX_SIZE}",
        "--log-opt", f"max-file={LOG_MAX_FILE}",
        "--default-address-pool", ADDRESS_POOL,
        # explicit although default: tenant networks are isolated by iptables
        "--iptables=true",
    ]


def ping(host: Host, headers: Mapping[str, str], timeout: float = 2.0) -> bool:
    """The engine answers ``GET /_ping`` (so the request passed its plugin)."""
    res = unix_http(host.engine_socket, "GET", f"{API}/_ping", headers=headers, timeout=timeout)
    return res is not None and res[0] == 200


def accepts(host: Host) -> bool:
    """The engine's socket accepts connections (a weaker probe than
    :func:`ping`, for when its plugin is down and every request would wait
    out the engine's ~30 s plugin retries)."""
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(1.0)
    try:
        s.connect(str(host.engine_socket))
        return True
    except OSError:
        return False
    finally:
        s.close()


def has_image(host: Host, headers: Mapping[str, str], ref: str = IMAGE) -> bool:
    res = unix_http(host.engine_socket, "GET", f"{API}/images/{ref}/json", headers=headers, timeout=10)
    return res is not None and res[0] == 200


# -- busybox -----------------------------------------------------------------------


def build_busybox_tar(path: Path, cmds: Commands) -> bool:
    """A root filesystem tar made of ``busybox-static``: /bin/busybox and a
    symlink per applet (not for ``busybox`` itself: ``--list`` names it),
    plus /tmp and a minimal /etc/passwd and /etc/group so that ``-u nobody``
    and programs writing to /tmp work.  Made once per state dir."""
    if path.exists():
        return False
    applets = cmds.run("busybox", [BUSYBOX, "--list"], capture=True).split()
    tmp = path.with_name(path.name + ".tmp")
    now = time.time()

    def entry(name: str, kind: bytes, mode: int, **kw) -> tarfile.TarInfo:
        ti = tarfile.TarInfo(name)
        ti.type, ti.mode, ti.mtime = kind, mode, now
        for k, v in kw.items():
            setattr(ti, k, v)
        return ti

    def text(name: str, data: str) -> None:
        raw = data.encode()
        tar.addfile(entry(name, tarfile.REGTYPE, 0o644, size=len(raw)), io.BytesIO(raw))

    with tarfile.open(tmp, "w") as tar:
        for d, mode in (("bin", 0o755), ("etc", 0o755), ("root", 0o700), ("tmp", 0o1777)):
            tar.addfile(entry(d, tarfile.DIRTYPE, mode))
        tar.add(os.path.realpath(BUSYBOX), arcname="bin/busybox")
        for a in applets:
            if a != "busybox" and "/" not in a:
                tar.addfile(entry(f"bin/{a}", tarfile.SYMTYPE, 0o777, linkname="busybox"))
        text("etc/passwd", "root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/nonexistent:/bin/false\n")
        text("etc/group", "root:x:0:\nnogroup:x:65534:\n")
    os.replace(tmp, path)
    return True


def import_busybox(host: Host, layout: Layout, cmds: Commands) -> None:
    """``docker import`` the busybox tar as busybox:latest, with the admin key."""
    cmds.run(component(host), [
        DOCKER, "--config", layout.admin_key_dir, "--host", f"unix://{host.engine_socket}",
        "import", "--change", "ENV PATH=/bin", layout.busybox_tar, IMAGE,
    ], timeout=120)


# -- stopping and cleaning up ----------------------------------------------------


def _container_ids(host: Host) -> set[str]:
    ids = set()
    for d in (host.task_dir, host.data_root / "containers"):
        if d.is_dir():
            ids.update(p.name for p in d.iterdir() if len(p.name) == 64)
    return ids


def _cgroup_dirs(cid: str) -> list[Path]:
    """The container's cgroups, v1 or v2, cgroupfs or systemd driver."""
    root = Path("/sys/fs/cgroup")
    pats = (f"*/docker/{cid}", f"docker/{cid}", f"*/system.slice/docker-{cid}.scope", f"system.slice/docker-{cid}.scope")
    return [p for pat in pats for p in root.glob(pat) if p.is_dir()]


def _cgroup_pids(cid: str) -> set[int]:
    pids: set[int] = set()
    for d in _cgroup_dirs(cid):
        try:
            pids.update(int(x) for x in (d / "cgroup.procs").read_text().split())
        except (OSError, ValueError):
            pass
    return pids


def _kill_containers(host: Host) -> list[int]:
    """SIGKILL every process in the engine's containers; the pids signalled."""
    killed = []
    for cid in _container_ids(host):
        for pid in _cgroup_pids(cid):
            signal_pid(pid, signal.SIGKILL)
            killed.append(pid)
    return killed


def _cmdline(pid: int) -> list[str]:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return [a.decode(errors="replace") for a in f.read().split(b"\0")]
    except OSError:
        return []


def _shims(host: Host) -> list[int]:
    """containerd-shim processes of this engine: their ``-address`` is its socket."""
    want = str(host.containerd_socket)
    out = []
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            args = _cmdline(int(entry.name))
            if "-address" in args and args[args.index("-address") + 1 : args.index("-address") + 2] == [want]:
                out.append(int(entry.name))
    return out


def stop(host: Host, pid: int | None, cmds: Commands) -> None:
    """Stop the engine (``pid``: its live dockerd, or None) and everything it
    left: containers, containerd, shims, shim sockets, cgroups."""
    comp = component(host)
    if pid is not None:
        cmds.note(comp, f"stop dockerd pid {pid} (TERM) and kill its containers")
        signal_pid(pid, signal.SIGTERM)
    killed = _kill_containers(host)
    if killed:
        cmds.note(comp, f"killed container processes {sorted(killed)}")
    if pid is not None and not wait_gone([pid], 30.0):
        cmds.note(comp, f"dockerd pid {pid} still running after 30 s: KILL")
        signal_pid(pid, signal.SIGKILL)
        wait_gone([pid], 5.0)
    cleanup(host, cmds)


def _stop_containerd(host: Host, cmds: Commands) -> None:
    """Stop this engine's containerd if it outlived its dockerd."""
    try:
        text = host.containerd_pidfile.read_text().strip()
    except OSError:
        return
    if text.isdigit() and proc_alive(int(text)) and str(host.exec_root) in " ".join(_cmdline(int(text))):
        cmds.note(component(host), f"stop leftover containerd pid {text}")
        terminate(int(text), group=False, timeout=10.0)


def before_start(host: Host, cmds: Commands) -> None:
    """Prepare a (re)start of a dead engine.

    A dead dockerd's pid file would make the new one refuse to start if its
    pid were reused.  Its containerd may still be alive, dying, or a zombie
    (it dies with dockerd, and init reaps orphans lazily on some machines):
    dockerd takes any of these for "containerd is still running" (it tests
    with kill(pid, 0)) and then times out waiting for its socket.  So stop a
    live one and remove its pid file: dockerd starts a new containerd.

    The containers of the dead engine are killed too: a dockerd without
    live-restore stops every container it finds running at start, giving
    each 10 s to exit on TERM; the outcome is the same (restart policies
    apply), only 10 s sooner.  And so are their shims (:func:`cleanup`): a
    shim whose container died while no containerd listened may still report
    its task as running to the new containerd, and dockerd then cannot start
    the container again ("restartmanger wait error: id already in use", seen
    under load), so a ``--restart always`` container would stay down.
    Without shims, the new containerd knows no task and dockerd restarts
    such containers as after a reboot.
    """
    host.dockerd_pidfile.unlink(missing_ok=True)
    _stop_containerd(host, cmds)
    host.containerd_pidfile.unlink(missing_ok=True)
    killed = _kill_containers(host)
    if killed:
        cmds.note(component(host), f"killed the dead engine's container processes {sorted(killed)}")
        wait_gone(killed, 5.0)
    cleanup(host, cmds)


def cleanup(host: Host, cmds: Commands) -> None:
    """Remove what a dead dockerd may have left running or lying around outside
    its state dir.  Only this engine's things are touched."""
    comp = component(host)
    _stop_containerd(host, cmds)
    killed = _kill_containers(host)
    shims = _shims(host)
    for pid in shims:
        signal_pid(pid, signal.SIGKILL)
    if killed or shims:
        cmds.note(comp, f"killed leftover container processes {sorted(killed)} and shims {shims}")
        wait_gone(killed + shims, 5.0)
    # shims listen under /run/containerd/s/ (outside DIR); a killed one leaves its socket
    if host.task_dir.is_dir():
        for bundle in host.task_dir.iterdir():
            try:
                addr = (bundle / "address").read_text().strip()
            except OSError:
                continue
            if addr.startswith("unix:///run/containerd/s/"):
                Path(addr[len("unix://") :]).unlink(missing_ok=True)
    for cid in _container_ids(host):
        for d in sorted(_cgroup_dirs(cid), key=lambda p: len(p.parts), reverse=True):
            try:
                d.rmdir()  # only empty cgroups can go; a busy one stays and says so below
            except OSError as e:
                cmds.note(comp, f"cannot remove cgroup {d}: {e}")


def _unescape(field: str) -> str:
    # mountinfo escapes space, tab, newline and backslash as \ooo
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), field)


def mounts_under(root: Path) -> list[str]:
    """Mount points at or below ``root``, deepest first."""
    prefix = str(root).rstrip("/") + "/"
    out = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            mp = _unescape(line.split()[4])
            if mp == str(root) or mp.startswith(prefix):
                out.append(mp)
    return sorted(set(out), key=lambda p: (p.count("/"), p), reverse=True)


def unmount_under(root: Path, cmds: Commands) -> list[str]:
    """Unmount everything at or below ``root`` (overlays, nsfs, shm, binds
    that dockerd left); lazily when busy.  Returns what is still mounted."""
    for mp in mounts_under(root):
        try:
            cmds.run("down", [UMOUNT, mp], timeout=30)
        except Exception:
            try:
                cmds.run("down", [UMOUNT, "--lazy", mp], timeout=30)
            except Exception:
                pass
    return mounts_under(root)
