"""Pieces shared by the benchmarks in this folder (``plugin_inspect.py``,
``scoper_inspect.py``): not a benchmark itself.

* :class:`Client` -- persistent keep-alive HTTP/1.1 connections (unix socket,
  or TLS over TCP) with a prebuilt request and :class:`Reader` (from
  ``allow_all_plugin.py``) for the answer; ``batch`` spreads requests over
  the connections, one thread each;
* :func:`pct`, :func:`ratio`, :func:`round_ratio` -- the statistics;
* :func:`cpu_ns`, :func:`children`, :func:`rss_kib`, :func:`log_size` --
  what ``/proc`` says about processes and files;
* :func:`machine` -- the report's ``date`` and ``machine`` lines;
* :func:`spy_record`, :func:`spy_stacks`, :func:`spy_tally` -- ``py-spy
  record --gil --format raw`` on some processes, its samples, and their sum
  per function;
* :func:`progress`, :func:`interrupt_on_sigterm` -- progress lines on stderr
  and SIGTERM as Ctrl-C (both benchmarks clean up in a ``finally``);
* :class:`Row`, :func:`write_rows`, :func:`read_rows` -- a benchmark's
  results for the one table that ``run.py`` prints (``--json FILE``).

Import it with this folder on ``sys.path`` (each benchmark puts it there).
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import math
import os
import platform
import shutil
import signal
import socket
import ssl
import statistics
import sys
import threading
import time
from pathlib import Path
from typing import Callable, Iterable, Sequence

from allow_all_plugin import Reader  # noqa: F401 -- re-exported: the client's HTTP reader

__all__ = ["Reader", "Client", "unix_connector", "tls_connector", "pct", "ratio", "round_ratio", "cpu_ns",
           "children", "rss_kib", "log_size", "machine", "spy_path", "spy_record", "spy_stacks", "spy_tally",
           "spy_function", "progress", "interrupt_on_sigterm", "Row", "write_rows", "read_rows"]


# -- the client ------------------------------------------------------------------------


def unix_connector(path: str) -> Callable[[], socket.socket]:
    """A function that opens a new connection to the unix socket ``path``."""

    def connect() -> socket.socket:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.settimeout(60.0)
        s.connect(path)
        return s

    return connect


def tls_connector(host: str, port: int, context: ssl.SSLContext,
                  server_hostname: str | None = None) -> Callable[[], socket.socket]:
    """A function that opens a new verified TLS connection to ``host:port``
    (TCP_NODELAY, as Go clients such as the docker CLI set it)."""

    def connect() -> socket.socket:
        raw = socket.create_connection((host, port), timeout=60.0)
        raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        try:
            return context.wrap_socket(raw, server_hostname=server_hostname or host)
        except BaseException:
            raw.close()
            raise

    return connect


class Client:
    """``conc`` persistent keep-alive connections to one server.

    ``target`` is a unix socket path, or a function returning a new connected
    socket (:func:`unix_connector`, :func:`tls_connector`).  A minimal
    HTTP/1.1 client (a prebuilt request, :class:`Reader` for the answer):
    ``http.client`` costs some 150 us per request here, on every path
    alike, which would flatten the ratios."""

    def __init__(self, target: str | Callable[[], socket.socket], conc: int, headers: dict[str, str]):
        connect = unix_connector(target) if isinstance(target, str) else target
        self.socks = []
        try:
            for _ in range(conc):
                self.socks.append(connect())
        except BaseException:
            self.close()
            raise
        self.headers = "".join(f"{k}: {v}\r\n" for k, v in headers.items())

    def request(self, url: str) -> bytes:
        return f"GET {url} HTTP/1.1\r\nHost: docker\r\n{self.headers}\r\n".encode()

    @staticmethod
    def _loop(sock: socket.socket, req: bytes, n: int, out: list[int], errors: list[str]) -> None:
        pc = time.perf_counter_ns
        r = Reader(sock)
        send, head, body = sock.sendall, r.head, r.body
        try:
            for _ in range(n):
                t0 = pc()
                send(req)
                status, headers = head()
                data = body(headers)
                t1 = pc()
                if status[9:12] != b"200":
                    errors.append(f"{req.split()[1].decode()}: {status.decode()} {data[:300]!r}")
                    return
                out.append(t1 - t0)
        except Exception as e:  # noqa: BLE001 -- reported by the caller
            errors.append(f"{req.split()[1].decode()}: {e!r}")

    def batch(self, url: str, n: int) -> tuple[list[int], int]:
        """``n`` requests spread over the connections; (latencies, wall ns)."""
        req = self.request(url)
        errors: list[str] = []
        k = len(self.socks)
        if k == 1:
            out: list[int] = []
            t0 = time.perf_counter_ns()
            self._loop(self.socks[0], req, n, out, errors)
            wall = time.perf_counter_ns() - t0
        else:
            outs: list[list[int]] = [[] for _ in range(k)]
            barrier = threading.Barrier(k + 1)

            def run(i: int) -> None:
                barrier.wait()
                self._loop(self.socks[i], req, n // k + (i < n % k), outs[i], errors)

            threads = [threading.Thread(target=run, args=(i,)) for i in range(k)]
            for t in threads:
                t.start()
            barrier.wait()
            t0 = time.perf_counter_ns()
            for t in threads:
                t.join()
            wall = time.perf_counter_ns() - t0
            out = [x for o in outs for x in o]
        if errors:
            raise RuntimeError(f"request failed: {errors[0]}")
        return out, wall

    def close(self) -> None:
        for s in self.socks:
            s.close()


# -- statistics ------------------------------------------------------------------------


def pct(sorted_ns: list[int], p: float) -> float:
    """Nearest-rank percentile, in microseconds."""
    if not sorted_ns:
        return float("nan")
    return sorted_ns[max(0, math.ceil(p / 100 * len(sorted_ns)) - 1)] / 1000


def ratio(a: float, b: float) -> str:
    return f"{a / b:.2f}" if b > 0 else "-"


def round_ratio(a_rounds: Sequence[list[int]], b_rounds: Sequence[list[int]], p: float = 50) -> float:
    """Median over rounds of the per-round ratio of percentile ``p``: a noisy
    round moves it less than it moves the pooled ratio."""
    return statistics.median(pct(sorted(a), p) / pct(sorted(b), p) for a, b in zip(a_rounds, b_rounds))


# -- /proc ------------------------------------------------------------------------------

_TICK_NS = 1e9 / os.sysconf("SC_CLK_TCK")


def cpu_ns(pids: Iterable[int]) -> float:
    """utime + stime of processes (all their threads, live and exited), in ns;
    clock-tick resolution, unbiased once summed over many batches."""
    total = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            total += int(fields[11]) + int(fields[12])
        except (OSError, IndexError, ValueError):
            pass
    return total * _TICK_NS


def children(pid: int) -> list[int]:
    out = []
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            try:
                with open(f"/proc/{entry.name}/stat") as f:
                    if int(f.read().rsplit(")", 1)[1].split()[1]) == pid:
                        out.append(int(entry.name))
            except (OSError, IndexError, ValueError):
                pass
    return out


def rss_kib(pid: int, field: str = "VmRSS") -> int | None:
    """``field`` (``VmRSS``, ``VmHWM``, ...) of ``/proc/PID/status`` in KiB,
    or None when the process is gone."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        return None
    return None


def log_size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:
        return 0


# -- report ----------------------------------------------------------------------------


def machine() -> list[str]:
    cpu = "?"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return [
        f"date     {datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='seconds')}",
        f"machine  {platform.node()}: nproc {len(os.sched_getaffinity(0))}, {cpu}, "
        f"Linux {platform.release()}, Python {platform.python_version()}",
    ]


# -- py-spy ----------------------------------------------------------------------------


def spy_path() -> str | None:
    spy = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
    return spy if os.path.exists(spy) else None


def spy_record(cmds, spy: str, pids: Sequence[int], files: Sequence[Path], rate: int, seconds: float,
               load: Callable[[float], int]) -> int:
    """``py-spy record --gil --format raw`` on each of ``pids`` (into
    ``files``) for ``seconds`` while ``load(deadline)`` runs requests until
    the monotonic ``deadline``; returns the number of requests it made.
    ``cmds`` is a devstack ``Commands`` (its log gets py-spy's output)."""
    procs = [cmds.popen("profile", [spy, "record", "--pid", str(p), "--rate", str(rate), "--duration",
                                    str(int(seconds)), "--gil", "--format", "raw", "-o", str(f)])
             for p, f in zip(pids, files)]
    try:
        time.sleep(1.0)  # py-spy attaching
        n = load(time.monotonic() + seconds - 1.5)
        for p in procs:
            p.wait(timeout=seconds + 30)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    return n


def spy_function(frame: str) -> str:
    """``name (file:line)`` -> ``name (file)``: one entry per function."""
    return frame.rsplit(":", 1)[0] + ")" if frame.endswith(")") and ":" in frame else frame


def spy_stacks(files: Iterable[Path]) -> Iterable[tuple[list[str], int]]:
    """The samples of py-spy raw (collapsed-stack) files: (frames, root
    first; count)."""
    for f in files:
        try:
            text = f.read_text()
        except OSError:
            continue
        for line in text.splitlines():
            stack, _, count = line.rpartition(" ")
            if count.isdigit():
                yield stack.split(";"), int(count)


def spy_tally(files: Iterable[Path], trivial: Sequence[str]) -> tuple[int, dict[str, int], dict[str, int]]:
    """Add up py-spy raw (collapsed-stack) files: ``(samples, inclusive,
    self)``, per function; frames containing any of ``trivial`` are left
    out of ``inclusive``."""
    incl: dict[str, int] = {}
    own: dict[str, int] = {}
    total = 0
    for frames, k in spy_stacks(files):
        total += k
        seen = set()
        for frame in frames:
            fn = spy_function(frame)
            if fn not in seen and not any(t in fn for t in trivial):
                seen.add(fn)
                incl[fn] = incl.get(fn, 0) + k
        if frames:
            fn = spy_function(frames[-1])
            own[fn] = own.get(fn, 0) + k
    return total, incl, own


# -- process -----------------------------------------------------------------------------


def progress(prefix: str) -> Callable[[str], None]:
    """A function printing ``prefix: msg`` on stderr that never raises (a
    closed pipe, e.g. ``| tee`` killed by the same Ctrl-C, must not cut the
    clean-up short)."""

    def say(msg: str) -> None:
        try:
            print(f"{prefix}: {msg}", file=sys.stderr, flush=True)
        except (OSError, ValueError):
            pass

    return say


def _terminated(_sig, _frm):
    raise KeyboardInterrupt


def interrupt_on_sigterm() -> None:
    """SIGTERM raises KeyboardInterrupt, as Ctrl-C does: one clean-up path."""
    signal.signal(signal.SIGTERM, _terminated)


def run_bench(b, work: Callable[[], None], say: Callable[[str], None]) -> int:
    """Run ``work`` with ``b`` (a benchmark with ``keep_logs()`` and
    ``cleanup() -> problems``) and always clean up, also on Ctrl-C or TERM;
    the exit code: 0, 1 on a failure or a clean-up problem, 130 when
    interrupted."""
    interrupt_on_sigterm()
    rc, problems = 0, []
    try:
        work()
    except KeyboardInterrupt:
        rc = 130
    except Exception as e:  # noqa: BLE001 -- report, clean up, fail
        rc = 1
        say(f"failed: {e}")
        try:
            say(f"logs kept in {b.keep_logs()}")
        except Exception:  # noqa: BLE001
            pass
    finally:
        # a second Ctrl-C (or a TERM) must not cut the clean-up short
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        if rc == 130:
            say("interrupted")
        say("cleaning up")
        problems = b.cleanup()
    for p in problems:
        say(f"clean-up: {p}")
    if problems and rc == 0:
        rc = 1
    return rc


# -- the one table ----------------------------------------------------------------------


@dataclasses.dataclass
class Row:
    """One line of the summary table: a figure of FDCS's path next to the
    same figure of its references, measured in the same run.

    ``ratio`` is FDCS's figure over ``ratio_of``'s, in the sense of the
    target: a latency, RSS or CPU ratio (lower is better) or a throughput
    ratio (higher is better) -- ``target`` says which ("<= 1.3", ">= 0.8",
    "== 0", "<= 60 MB").  ``met`` is None when the row has no target.
    ``note`` says what explains a missed target (a profile's summary) or
    how the figure was taken, briefly.
    """
    bench: str                     # plugin, scoper, streams, lifecycle, scale, identity, memory
    case: str                      # e.g. "inspect by id, c=8"
    metric: str                    # e.g. "p50 us", "MB/s", "MB RSS"
    value: float                   # FDCS's figure
    refs: dict[str, float] = dataclasses.field(default_factory=dict)  # reference name -> its figure
    ratio_of: str = ""             # the reference the ratio is taken against ("" = none)
    ratio: float | None = None
    target: str = ""
    met: bool | None = None
    note: str = ""


def write_rows(path: str | Path, rows: Iterable[Row]) -> None:
    """Write ``rows`` as JSON to ``path`` (``--json FILE`` of every benchmark)."""
    Path(path).write_text(json.dumps([dataclasses.asdict(r) for r in rows], indent=1))


def read_rows(path: str | Path) -> list[Row]:
    return [Row(**d) for d in json.loads(Path(path).read_text())]


# -- raw requests, an extra FDCS plugin (lifecycle.py, scale.py, identity.py) -----------


class Conn:
    """One keep-alive HTTP/1.1 connection for requests of any method, with a
    body: the raw-API client of ``lifecycle.py`` and the hook client of
    ``scale.py``/``identity.py`` (the plugin's socket).  ``target`` as for
    :class:`Client`; ``headers`` go with every request."""

    def __init__(self, target: str | Callable[[], socket.socket], headers: dict[str, str] | None = None):
        self.sock = (unix_connector(target) if isinstance(target, str) else target)()
        self.reader = Reader(self.sock)
        self.headers = "".join(f"{k}: {v}\r\n" for k, v in (headers or {}).items())

    def request(self, method: str, url: str, body: bytes | None = None,
                content_type: str = "application/json") -> tuple[int, bytes]:
        """(status, body); raises on a broken connection (never retried:
        requests here are not idempotent)."""
        head = f"{method} {url} HTTP/1.1\r\nHost: docker\r\n{self.headers}"
        if body is not None:
            head += f"Content-Type: {content_type}\r\nContent-Length: {len(body)}\r\n"
        self.sock.sendall(head.encode() + b"\r\n" + (body or b""))
        status, headers = self.reader.head()
        return int(status[9:12]), self.reader.body(headers)

    def close(self) -> None:
        self.sock.close()


def start_fdcs_plugin(cmds, host, conf: str | Path, pidfile: Path, env: dict[str, str] | None = None,
                      timeout: float = 60) -> tuple[int, str]:
    """Start the real plugin (``fdcs-authz --config CONF``, as the devstack
    starts it) for ``host`` (a devstack ``Host``, e.g. ``plugin_inspect``'s
    ``BenchHost``): its host id, plugin name and socket from ``host``,
    metrics on a free loopback port, ``env`` (``FDCS_*`` overrides) on top.
    Waits for ``/Plugin.Activate``; returns ``(pid, metrics URL)``.  The
    caller stops it by pid (``_procs.terminate``: gunicorn's group) -- with
    ``pidfile`` = ``plugin_inspect.Bench``'s ``run/plugin-<suffix>.pid`` its
    ``cleanup`` does."""
    from authz_plugin.devstack._procs import free_ports, wait_until
    from authz_plugin.devstack._stack import _authz_command, plugin_ready

    port = free_ports(1)[0]
    comp = f"fdcs-plugin-{host.suffix}"
    pid = cmds.spawn(comp, [_authz_command(), "--config", str(conf)], pidfile,
                     env={"FDCS_HOST_ID": host.name, "FDCS_PLUGIN_NAME": host.plugin_name,
                          "FDCS_PLUGIN_SOCKET": str(host.plugin_socket),
                          "FDCS_PLUGIN_METRICS_LISTEN": f"127.0.0.1:{port}", **(env or {})})
    wait_until(lambda: plugin_ready(host), component=comp, log=cmds.log_path(comp), timeout=timeout, pid=pid)
    return pid, f"http://127.0.0.1:{port}/metrics"


def authz_payload(method: str, uri: str, headers: dict[str, str], body: bytes | None = None,
                  status: int | None = None, response: bytes | None = None) -> bytes:
    """An ``AuthZReq`` (``status`` None) or ``AuthZRes`` body as dockerd 20.10
    sends it to ``/AuthZPlugin.AuthZReq``/``AuthZRes`` (moby
    pkg/authorization: ``RequestBody``/``ResponseBody`` base64 in Go's JSON
    of ``[]byte``; the body only when it is JSON under 1 MiB, which a create
    is; ``RequestHeaders`` the client's headers, one value each)."""
    import base64
    # Go's http.Header keys, canonicalised (X-Auth-Tenantid); one value each
    h = {"-".join(w[:1].upper() + w[1:].lower() for w in k.split("-")): v for k, v in headers.items()}
    if body is not None:
        h.setdefault("Content-Type", "application/json")
        h["Content-Length"] = str(len(body))
    # moby's field tags: RequestUri (not URI); empty fields omitted (omitempty)
    p: dict = {"RequestMethod": method, "RequestUri": uri, "RequestHeaders": h}
    if body is not None:
        p["RequestBody"] = base64.b64encode(body).decode()
    if status is not None:
        p["ResponseStatusCode"] = status
        p["ResponseHeaders"] = {"Content-Type": "application/json"}
        if response is not None:
            p["ResponseBody"] = base64.b64encode(response).decode()
    return json.dumps(p).encode()


#: the body ``/usr/bin/docker create --cgroupns private --label org.fiware.fdcs.tenant=T
#: --pids-limit 100 --network none busybox true`` sends (Debian's CLI 20.10.24, captured)
_CLI_CREATE = (
    '{"Hostname":"","Domainname":"","User":"","AttachStdin":false,"AttachStdout":true,"AttachStderr":'
    'true,"Tty":false,"OpenStdin":false,"StdinOnce":false,"Env":null,"Cmd":["true"],"Image":"busybox"'
    ',"Volumes":{},"WorkingDir":"","Entrypoint":null,"OnBuild":null,"Labels":{"org.fiware.fdcs.tenant'
    '":"{tenant}"},"HostConfig":{"Binds":null,"ContainerIDFile":"","LogConfig":{"Type":"","Config":{}'
    '},"NetworkMode":"none","PortBindings":{},"RestartPolicy":{"Name":"no","MaximumRetryCount":0},"Au'
    'toRemove":false,"VolumeDriver":"","VolumesFrom":null,"CapAdd":null,"CapDrop":null,"CgroupnsMode"'
    ':"private","Dns":[],"DnsOptions":[],"DnsSearch":[],"ExtraHosts":null,"GroupAdd":null,"IpcMode":"'
    '","Cgroup":"","Links":null,"OomScoreAdj":0,"PidMode":"","Privileged":false,"PublishAllPorts":fal'
    'se,"ReadonlyRootfs":false,"SecurityOpt":null,"UTSMode":"","UsernsMode":"","ShmSize":0,"ConsoleSi'
    'ze":[0,0],"Isolation":"","CpuShares":0,"Memory":0,"NanoCpus":0,"CgroupParent":"","BlkioWeight":0'
    ',"BlkioWeightDevice":[],"BlkioDeviceReadBps":null,"BlkioDeviceWriteBps":null,"BlkioDeviceReadIOp'
    's":null,"BlkioDeviceWriteIOps":null,"CpuPeriod":0,"CpuQuota":0,"CpuRealtimePeriod":0,"CpuRealtim'
    'eRuntime":0,"CpusetCpus":"","CpusetMems":"","Devices":[],"DeviceCgroupRules":null,"DeviceRequest'
    's":null,"KernelMemory":0,"KernelMemoryTCP":0,"MemoryReservation":0,"MemorySwap":0,"MemorySwappin'
    'ess":-1,"OomKillDisable":false,"PidsLimit":100,"Ulimits":null,"CpuCount":0,"CpuPercent":0,"IOMax'
    'imumIOps":0,"IOMaximumBandwidth":0,"MaskedPaths":null,"ReadonlyPaths":null},"NetworkingConfig":{'
    '"EndpointsConfig":{}}}'
)


def cli_create_body(tenant: str) -> bytes:
    """What the docker CLI sends to ``POST /containers/create`` for a
    plugin-only ``busybox true`` of ``tenant`` (label, ``--pids-limit 100``,
    ``--network none``, ``--cgroupns private``: what the plugin requires)."""
    return _CLI_CREATE.replace("{tenant}", tenant).encode()
