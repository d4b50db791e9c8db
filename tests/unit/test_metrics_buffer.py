"""The plugin's buffered metrics (authz_plugin/metrics.py, ``_Buffer``):
decisions and identity events queued on the request path and applied,
summed, by a background thread within ``FLUSH_LINGER`` seconds and at exit
-- with the same totals, buckets and sums as applying them one by one."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from authz_plugin import metrics

ROOT = Path(__file__).resolve().parents[2]

#: decisions spread over buckets, reasons and both hooks (seconds include 0, negative, over the top bucket)
DECISIONS = [("request", True, "ok", 0.00005), ("request", True, "ok", 0.0003), ("request", False, "policy", 0.002),
             ("response", True, "recorded", 0.02), ("request", True, "ok", 3.0), ("request", True, "ok", 0.0),
             ("request", False, "BAD reason!", -1.0), ("request", True, "ok", 0.00025)]


def samples(registry) -> dict:
    out = {}
    for fam in text_string_to_metric_families(generate_latest(registry).decode()):
        for s in fam.samples:
            if not s.name.endswith("_created"):
                out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


@pytest.fixture
def fresh():
    metrics.reset()
    yield
    metrics.reset()


def _run(buffered: bool) -> tuple[metrics.PluginMetrics, dict]:
    metrics.reset()
    m = metrics.activate("plugin", CollectorRegistry(), buffered=buffered)
    for d in DECISIONS:
        metrics.decision(*d)
    for e in ("hits", "hit", "miss", "nonsense"):
        metrics.identity_event(e)
    return m, samples(m.registry)


def test_buffered_steps_wait_for_the_flush_then_equal_the_direct_ones(fresh):
    direct_m, direct = _run(buffered=False)
    assert direct_m.buffer is None
    assert direct[("fdcs_authz_decisions_total", (("hook", "request"), ("reason", "ok"), ("result", "allow")))] == 5
    m, before = _run(buffered=True)
    assert m.buffer is not None
    # nothing applied yet (the thread waits FLUSH_LINGER after the first step)
    assert before.get(("fdcs_authz_decisions_total", (("hook", "request"), ("reason", "ok"), ("result", "allow")))) \
        in (None, 0.0)
    metrics.flush()
    after = samples(m.registry)
    assert after == direct  # counters, every bucket, sums and counts alike
    assert after[("fdcs_identity_events_total", (("event", "hit"),))] == 2
    assert after[("fdcs_authz_decisions_total", (("hook", "request"), ("reason", "other"), ("result", "deny")))] == 1
    metrics.flush()  # nothing queued: no change
    assert samples(m.registry) == direct


def test_the_thread_applies_within_the_linger(fresh):
    m = metrics.activate("plugin", CollectorRegistry(), buffered=True)
    key = ("fdcs_authz_decisions_total", (("hook", "request"), ("reason", "ok"), ("result", "allow")))
    t0 = time.monotonic()
    metrics.decision("request", True, "ok", 0.001)
    deadline = t0 + 5
    while samples(m.registry).get(key) != 1.0:
        assert time.monotonic() < deadline, "the buffered decision was never applied"
        time.sleep(0.01)
    assert time.monotonic() - t0 < metrics.FLUSH_LINGER + 1.0
    # a second burst after the first flush is applied too (the event is set again)
    for _ in range(50):
        metrics.decision("request", True, "ok", 0.001)
    while samples(m.registry).get(key) != 51.0:
        assert time.monotonic() < deadline + 5, "the second burst was never applied"
        time.sleep(0.01)
    assert m.buffer.flushes >= 2


def test_single_process_mode_is_not_buffered_by_default(fresh):
    m = metrics.activate("plugin", CollectorRegistry())
    assert m.buffer is None  # prometheus_client is not in multiprocess mode in this process
    metrics.decision("request", True, "ok", 0.001)
    assert samples(m.registry)[("fdcs_authz_decisions_total",
                                (("hook", "request"), ("reason", "ok"), ("result", "allow")))] == 1
    assert metrics.activate("scoper", CollectorRegistry(), buffered=True).buffer is None  # the plugin's only


def test_a_metrics_fault_in_the_flush_never_escapes(fresh, monkeypatch):
    m = metrics.activate("plugin", CollectorRegistry(), buffered=True)
    metrics.decision("request", True, "ok", 0.001)

    def broken(*a, **kw):
        raise RuntimeError("broken metrics")
    monkeypatch.setattr(metrics, "_apply_decisions", broken)
    metrics.flush()  # swallowed
    assert len(m.buffer.q) == 0
    monkeypatch.undo()
    metrics.decision("request", True, "ok", 0.001)
    metrics.flush()  # positive control: applied
    assert samples(m.registry)[("fdcs_authz_decisions_total",
                                (("hook", "request"), ("reason", "ok"), ("result", "allow")))] == 1


_CHILD = r"""
import os, sys, time
from prometheus_client import CollectorRegistry
from authz_plugin import metrics
m = metrics.activate("plugin")
assert m.buffer is not None, "multiprocess mode must buffer"
metrics.decision("request", True, "ok", 0.001)  # the parent's, pending at the fork
pid = os.fork()
if pid == 0:
    # the child: its own thread, none of the parent's pending steps
    for _ in range(3):
        metrics.decision("request", False, "policy", 0.001)
    sys.exit(0)  # atexit applies the pending steps
os.waitpid(pid, 0)
for _ in range(4):
    metrics.identity_event("hit")
sys.exit(0)  # at exit: applied without waiting for the thread
"""


def test_multiprocess_exit_flushes_and_a_child_counts_only_its_own(tmp_path):
    mdir = tmp_path / "mp"
    mdir.mkdir(mode=0o700)
    env = {**os.environ, metrics.MULTIPROC_ENV: str(mdir),
           "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    subprocess.run([sys.executable, "-c", _CHILD], env=env, check=True, timeout=60)
    from prometheus_client.multiprocess import MultiProcessCollector
    reg = CollectorRegistry()
    MultiProcessCollector(reg, path=str(mdir))
    s = samples(reg)
    ok = ("fdcs_authz_decisions_total", (("hook", "request"), ("reason", "ok"), ("result", "allow")))
    deny = ("fdcs_authz_decisions_total", (("hook", "request"), ("reason", "policy"), ("result", "deny")))
    assert s.get(ok) == 1  # the parent's decision, counted once (not again by the child)
    assert s.get(("fdcs_identity_events_total", (("event", "hit"),))) == 4
    assert s.get(deny) == 3  # the child's, applied at its exit
