#!/usr/bin/env python3
"""Every FDCS benchmark, one table.

    python3 benchmarks/run.py [--quick] [--only NAME,...] [--keep-stack DIR] [--out DIR]

Runs each benchmark of this folder as its own process, in this order --
``plugin_inspect`` (plugin vs allow-all plugin vs no plugin), ``scoper_inspect``
(name scoper vs HAProxy vs the engine), ``streams`` (cp, exec -i, logs -f),
``lifecycle`` (create/start/wait/rm), ``scale`` (hook latency vs records),
``identity`` (cold and warm token validation), ``memory`` (RSS at rest and
under 200 streams) -- each with ``--keep-stack DIR --json FILE`` so that they
share one local stack (brought up by the first, torn down at the end unless
``--keep-stack`` was given).  Each benchmark's detailed report (its own
tables, profiles of missed targets) goes to ``OUT/<name>.txt``; this prints
the date, machine, commit and command, then one table of every benchmark's
summary rows (``_common.Row``): FDCS's figure, its references measured in
the same run, the ratio, the target and whether it is met, and the notes.

Exit status: 0 when every benchmark ran (targets met or not: the table says),
1 when one failed (its report says why), 130 when interrupted.  Root only;
the machine set up as the README says (``.ci/install-deps``).
"""

from __future__ import annotations

import argparse
import os
import shlex
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from _common import Row, machine, progress, read_rows  # noqa: E402

ORDER = ("plugin_inspect", "scoper_inspect", "streams", "lifecycle", "scale", "identity", "memory")

say = progress("run")


def table(rows: list[Row]) -> str:
    """The one table: a line per row, notes as numbered footnotes."""
    head = ("BENCH", "CASE", "METRIC", "FDCS", "REFERENCES (same run)", "RATIO", "TARGET", "MET")
    body, notes = [], []

    def fig(v: float) -> str:
        return f"{v:.3g}" if abs(v) < 10 else f"{v:.0f}"

    for r in rows:
        refs = ", ".join(f"{k} {fig(v)}" for k, v in r.refs.items()) or "-"
        ratio = f"{r.ratio:.2f}" + (f" /{r.ratio_of}" if r.ratio_of else "") if r.ratio is not None else "-"
        met = {True: "yes", False: "NO", None: ""}[r.met]
        if r.note:
            notes.append(r.note)
            met += f" [{len(notes)}]"
        body.append((r.bench, r.case, r.metric, fig(r.value), refs, ratio, r.target or "-", met))
    widths = [max(len(str(x[i])) for x in [head, *body]) for i in range(len(head))]
    out = ["  ".join(str(c).ljust(w) for c, w in zip(line, widths)).rstrip() for line in [head, *body]]
    out.insert(1, "  ".join("-" * w for w in widths))
    out += [""] + [f"[{i}] {n}" for i, n in enumerate(notes, 1)]
    return "\n".join(out)


def commit() -> str:
    try:
        rev = subprocess.run(["git", "-C", str(HERE.parent), "rev-parse", "--short", "HEAD"], capture_output=True,
                             text=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(HERE.parent), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return rev + (" (with uncommitted changes)" if dirty else "") if rev else "?"
    except (OSError, subprocess.SubprocessError):
        return "?"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="a smoke run of every benchmark (small sizes)")
    ap.add_argument("--only", metavar="NAME,...", help=f"run only these ({', '.join(ORDER)})")
    ap.add_argument("--keep-stack", metavar="DIR", help="use (or bring up) the local stack in DIR and leave it up")
    ap.add_argument("--out", metavar="DIR", help="where the detailed reports go (default: a new /tmp dir)")
    args = ap.parse_args(argv)
    names = [n.strip() for n in args.only.split(",")] if args.only else list(ORDER)
    unknown = [n for n in names if n not in ORDER]
    if unknown:
        ap.error(f"unknown benchmark(s) {', '.join(unknown)}; known: {', '.join(ORDER)}")
    if os.geteuid() != 0:
        ap.error("must run as root (the benchmarks start engines in network namespaces)")
    out = Path(args.out or tempfile.mkdtemp(prefix="fdcs-bench-", dir="/tmp"))
    out.mkdir(parents=True, exist_ok=True)
    stack = Path(args.keep_stack or out / "stack")

    started = time.monotonic()
    rows: list[Row] = []
    failed: list[str] = []
    current: list[subprocess.Popen] = []

    def stop(_sig, _frm):
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, stop)
    rc = 0
    try:
        for name in names:
            cmd = [sys.executable, str(HERE / f"{name}.py"), "--keep-stack", str(stack),
                   "--json", str(out / f"{name}.json")] + (["--quick"] if args.quick else [])
            say(f"{name}: {shlex.join(cmd[1:])} > {out / (name + '.txt')}")
            t0 = time.monotonic()
            with open(out / f"{name}.txt", "wb") as f:
                p = subprocess.Popen(cmd, stdout=f)  # its progress lines go to our stderr
                current[:] = [p]
                code = p.wait()
                current.clear()
            took = time.monotonic() - t0
            if code != 0 or not (out / f"{name}.json").exists():
                failed.append(name)
                say(f"{name}: FAILED (exit {code}, {took:.0f} s): see {out / (name + '.txt')}")
                continue
            rows += read_rows(out / f"{name}.json")
            say(f"{name}: done ({took:.0f} s)")
    except KeyboardInterrupt:
        rc = 130
        for p in current:  # it cleans up after itself on SIGTERM
            p.terminate()
            p.wait()
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        if not args.keep_stack and stack.exists():
            say("stopping the local stack")
            subprocess.run(["fdcs-devstack", "down", "--state-dir", str(stack)], stdout=subprocess.DEVNULL)

    lines = machine() + [
        f"commit   {commit()}",
        f"command  python3 benchmarks/{Path(__file__).name} {shlex.join(argv if argv is not None else sys.argv[1:])}",
        f"took     {time.monotonic() - started:.0f} s; detailed reports in {out}/<benchmark>.txt",
        "",
        table(rows),
    ]
    if failed:
        lines += ["", f"FAILED: {', '.join(failed)} (see their reports)"]
    text = "\n".join(lines)
    (out / "summary.txt").write_text(text + "\n")
    print(text, flush=True)
    if rc:
        return rc
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
