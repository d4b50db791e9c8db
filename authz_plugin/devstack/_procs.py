"""Processes of the local stack: commands, pid files, start, stop, readiness.

Contracts:

* Every command the stack runs goes through :class:`Commands`, which appends
  it (time, component, extra environment with secrets masked, argv) to
  ``DIR/logs/commands.log`` before running it.
* A daemon is started by :meth:`Commands.spawn` as a session leader (its own
  process group, detached from the terminal), stdin from /dev/null, stdout and
  stderr appended to its log, its pid written to its pid file.
* A pid file is trusted only while :func:`live_pid` says so: the process
  exists, is not a zombie, and started no later than the pid file was written.
  A recycled pid belongs to a process started after the file, so it never
  passes for ours, and nothing is ever signalled on a stale pid file.
* Waiting is polling with a deadline (:func:`wait_until`), never a fixed
  sleep; a wait fails early when the process it waits for has died.
"""

from __future__ import annotations

import datetime
import http.client
import os
import shlex
import signal
import socket
import subprocess
import threading
import time
from pathlib import Path
from typing import Callable, Iterable, Mapping, Sequence

from ._errors import Aborted, ComponentFailed

#: environment variables whose values never reach a log
SECRET_ENV = frozenset({"OS_BOOTSTRAP_PASSWORD", "FDCS_PASSWORD"})

_CLK_TCK = os.sysconf("SC_CLK_TCK")


def clean_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment of every command the stack runs: ours, without
    ``FDCS_*`` and ``DOCKER_*`` (a shell that sourced some stack's env file
    has ``FDCS_KEYSTONE_URL``, ``FDCS_REDIS_URL``, which the daemons would
    take as configuration overrides, and ``DOCKER_TLS_VERIFY``, which would
    turn the docker CLI's unix-socket calls into TLS), and without
    ``PROMETHEUS_MULTIPROC_DIR`` (the hosts' plugins would share one metrics
    directory: each makes its own), plus ``extra``."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("FDCS_", "DOCKER_")) and k.upper() != "PROMETHEUS_MULTIPROC_DIR"}
    env.update(extra or {})
    return env


def _boot_time() -> float:
    with open("/proc/stat") as f:
        for line in f:
            if line.startswith("btime "):
                return float(line.split()[1])
    raise RuntimeError("no btime in /proc/stat")


_BTIME = _boot_time()


class Commands:
    """Runs commands and daemons, logging each one to ``commands.log``.

    ``abort`` is shared by the steps of one ``up``: once set (a step failed),
    every :func:`wait_until` of the others stops early.
    """

    def __init__(self, log_dir: Path | None):
        """``log_dir`` None: log nothing (``down`` of a stack whose DIR is gone)."""
        self.log_dir = log_dir
        self.path = log_dir / "commands.log" if log_dir else None
        self._lock = threading.Lock()
        self.abort = threading.Event()

    def log_path(self, component: str) -> Path:
        return self.log_dir / f"{component}.log" if self.log_dir else Path(os.devnull)

    def note(self, component: str, text: str) -> None:
        """Append one line to ``commands.log`` (also for non-command actions
        such as Keystone API calls; never pass a secret)."""
        if self.path is None:
            return
        stamp = datetime.datetime.now().isoformat(timespec="milliseconds")
        with self._lock, open(self.path, "a") as f:
            f.write(f"{stamp} [{component}] {text}\n")

    def _note_argv(self, component: str, argv: Sequence[str], env: Mapping[str, str] | None) -> None:
        shown = [f"{k}={'***' if k in SECRET_ENV else shlex.quote(v)}" for k, v in (env or {}).items()]
        self.note(component, " ".join(shown + [shlex.quote(str(a)) for a in argv]))

    def run(
        self,
        component: str,
        argv: Sequence[str],
        *,
        env: Mapping[str, str] | None = None,
        timeout: float = 60.0,
        log: Path | None = None,
        capture: bool = False,
    ) -> str:
        """Run a command to completion; output goes to the component's log
        (or is returned when ``capture``).  A non-zero exit or a timeout
        raises :class:`ComponentFailed` naming the log."""
        log = log or self.log_path(component)
        self._note_argv(component, argv, env)
        with open(log, "ab") as out:
            try:
                res = subprocess.run(
                    [str(a) for a in argv],
                    stdin=subprocess.DEVNULL,
                    stdout=subprocess.PIPE if capture else out,
                    stderr=out,
                    env=clean_env(env),
                    timeout=timeout,
                    check=False,
                )
            except subprocess.TimeoutExpired:
                raise ComponentFailed(component, log, f"{Path(argv[0]).name} did not finish in {timeout:.0f} s") from None
            except OSError as e:
                raise ComponentFailed(component, log, f"cannot run {argv[0]}: {e}") from e
        if res.returncode != 0:
            raise ComponentFailed(component, log, f"{shlex.join(map(str, argv[:3]))} ... exited with {res.returncode}")
        return res.stdout.decode() if capture else ""

    def popen(
        self, component: str, argv: Sequence[str], *, env: Mapping[str, str] | None = None, log: Path | None = None
    ) -> subprocess.Popen:
        """Start a helper process (not a daemon) whose output goes to the log."""
        log = log or self.log_path(component)
        self._note_argv(component, argv, env)
        with open(log, "ab") as out:
            return subprocess.Popen(
                [str(a) for a in argv],
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=out,
                env=clean_env(env),
                start_new_session=True,
            )

    def spawn(
        self,
        component: str,
        argv: Sequence[str],
        pidfile: Path,
        *,
        env: Mapping[str, str] | None = None,
        log: Path | None = None,
    ) -> int:
        """Start a daemon in its own session and record its pid."""
        proc = self.popen(component, argv, env=env, log=log)
        # The Popen object is dropped: the daemon outlives this process.  If
        # it dies while we run, live_pid() reaps it.
        _write_atomic(pidfile, f"{proc.pid}\n")
        self.note(component, f"started pid {proc.pid}")
        return proc.pid


def _write_atomic(path: Path, text: str, mode: int = 0o644) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.chmod(tmp, mode)
    os.replace(tmp, path)


def write_if_changed(path: Path, text: str, mode: int = 0o644) -> bool:
    """Write ``text`` atomically unless the file already holds it; True if written."""
    try:
        if path.read_text() == text:
            return False
    except FileNotFoundError:
        pass
    _write_atomic(path, text, mode)
    return True


def read_pid(pidfile: Path) -> int | None:
    try:
        text = pidfile.read_text().split()
        return int(text[0]) if text else None
    except (FileNotFoundError, ValueError):
        return None


def _stat(pid: int) -> tuple[str, float] | None:
    """(state letter, start time in epoch seconds) of a process, or None."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            data = f.read()
    except (FileNotFoundError, ProcessLookupError):
        return None
    # the command name (field 2) may contain spaces and parentheses
    fields = data[data.rindex(")") + 2 :].split()
    return fields[0], _BTIME + int(fields[19]) / _CLK_TCK


def proc_alive(pid: int) -> bool:
    """The process exists and is not a zombie (a zombie child of ours is reaped)."""
    st = _stat(pid)
    if st is None:
        return False
    if st[0] in ("Z", "X"):
        try:
            os.waitpid(pid, os.WNOHANG)
        except ChildProcessError:
            pass
        return False
    return True


def live_pid(pidfile: Path) -> int | None:
    """The pid in ``pidfile`` if that process is alive and is the one the file
    was written for (see the module docstring); else None."""
    pid = read_pid(pidfile)
    if pid is None:
        return None
    st = _stat(pid)
    if st is None or not proc_alive(pid):
        return None
    try:
        written = pidfile.stat().st_mtime
    except FileNotFoundError:
        return None
    # 1 s of slack: start times are in clock ticks, mtimes may be coarse.
    return pid if st[1] <= written + 1.0 else None


def signal_pid(pid: int, sig: int, *, group: bool = False) -> None:
    try:
        if group:
            os.killpg(pid, sig)
        else:
            os.kill(pid, sig)
    except ProcessLookupError:
        pass


def wait_gone(pids: Iterable[int], timeout: float) -> bool:
    """Poll until none of ``pids`` is alive; True if they all went in time."""
    pids = list(pids)
    deadline = time.monotonic() + timeout
    delay = 0.01
    while True:
        if not any(proc_alive(p) for p in pids):
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(delay)
        delay = min(delay * 2, 0.1)


def terminate(pid: int, *, group: bool = True, timeout: float = 10.0, sig: int = signal.SIGTERM) -> None:
    """Stop a verified-live daemon: ``sig`` (TERM), wait up to ``timeout``,
    then KILL.  With ``group`` the whole process group gets the signals (the
    daemon's workers, e.g. gunicorn's), the leader's pid being the group id."""
    signal_pid(pid, sig, group=group)
    if wait_gone([pid], timeout):
        if group:
            # Leftover members (workers that outlived the leader): the group id
            # cannot have been reused while they exist.
            signal_pid(pid, signal.SIGKILL, group=True)
        return
    signal_pid(pid, signal.SIGKILL, group=group)
    wait_gone([pid], 5.0)


def free_ports(n: int) -> list[int]:
    """``n`` distinct TCP ports free on 127.0.0.1 right now (all bound at
    once, so that they differ; the usual race with other programs remains)."""
    socks = []
    try:
        for _ in range(n):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def wait_until(
    ready: Callable[[], bool],
    *,
    component: str,
    log: Path,
    timeout: float,
    pid: int | None = None,
    abort: threading.Event | None = None,
    what: str = "not ready",
) -> None:
    """Poll ``ready`` until it returns True.

    Raises :class:`ComponentFailed` naming ``component`` and ``log`` when the
    deadline passes or when ``pid`` (the process being waited for) exits,
    and :class:`Aborted` when ``abort`` is set by a failing sibling step.
    """
    deadline = time.monotonic() + timeout
    delay = 0.02
    while True:
        if ready():
            return
        if pid is not None and not proc_alive(pid):
            raise ComponentFailed(component, log, f"process {pid} exited")
        if abort is not None and abort.is_set():
            raise Aborted(f"{component}: gave up, another component failed")
        if time.monotonic() >= deadline:
            raise ComponentFailed(component, log, f"{what} after {timeout:.0f} s")
        time.sleep(delay)
        delay = min(delay * 1.5, 0.25)


class _UnixHTTPConnection(http.client.HTTPConnection):
    def __init__(self, path: str, timeout: float):
        super().__init__("localhost", timeout=timeout)
        self._path = path

    def connect(self) -> None:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.settimeout(self.timeout)
        try:
            s.connect(self._path)
        except OSError:
            s.close()
            raise
        self.sock = s


def unix_http(
    path: str | Path,
    method: str,
    url: str,
    *,
    headers: Mapping[str, str] | None = None,
    body: bytes | None = None,
    timeout: float = 2.0,
) -> tuple[int, bytes] | None:
    """One HTTP request over a unix socket: (status, body), or None when the
    socket does not answer (missing, refused, timed out, reset)."""
    conn = _UnixHTTPConnection(str(path), timeout)
    try:
        conn.request(method, url, body=body, headers=dict(headers or {}))
        resp = conn.getresponse()
        return resp.status, resp.read()
    except (OSError, http.client.HTTPException):
        return None
    finally:
        conn.close()
