"""The name scoper's bulk-transfer settings: glibc malloc told to keep the
memory of large blocks (``server.tune_malloc``, tried in a child process:
it is process-wide)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

from name_scoper import _streams
from name_scoper.server import MALLOC_MMAP_THRESHOLD

glibc = pytest.mark.skipif(not os.confstr("CS_GNU_LIBC_VERSION").startswith("glibc"), reason="glibc only")

# In a child: call tune_malloc(), then malloc 8 blocks just under and 8 just
# over MALLOC_MMAP_THRESHOLD and count, by mallinfo2(), how many got an mmap of
# their own.
_CHILD = textwrap.dedent("""
    import ctypes, json, sys
    from name_scoper.server import MALLOC_MMAP_THRESHOLD, tune_malloc

    class Mallinfo2(ctypes.Structure):
        _fields_ = [(n, ctypes.c_size_t) for n in ("arena", "ordblks", "smblks", "hblks", "hblkhd",
                                                   "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]

    libc = ctypes.CDLL(None)
    libc.mallinfo2.restype = Mallinfo2
    libc.malloc.restype = ctypes.c_void_p
    libc.malloc.argtypes = (ctypes.c_size_t,)
    libc.free.argtypes = (ctypes.c_void_p,)

    def mapped(size, n=8):
        # n blocks held at once: the heap's free top (trimmed first) and a
        # free chunk left by start-up can serve one or two of them, not all
        libc.malloc_trim(0)
        before = libc.mallinfo2().hblks
        blocks = [libc.malloc(size) for _ in range(n)]
        after = libc.mallinfo2().hblks
        for p in blocks:
            libc.free(p)
        return after - before

    tuned = tune_malloc()
    print(json.dumps({"tuned": tuned, "under": mapped(MALLOC_MMAP_THRESHOLD - 64 * 1024),
                      "over": mapped(MALLOC_MMAP_THRESHOLD + 64 * 1024)}))
""")


def _child(**env) -> dict:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_") and k != "GLIBC_TUNABLES"}
    out = subprocess.run([sys.executable, "-c", _CHILD], env={**clean, **env}, capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


@glibc
def test_tune_malloc_keeps_blocks_under_the_threshold_in_the_heap():
    got = _child()
    # under it: none gets an mmap of its own (glibc's default threshold is
    # 128 KiB); over it, most do: the threshold is the one set, and
    # mallinfo2 sees the mmaps
    assert got["tuned"] is True and got["under"] == 0 and got["over"] >= 4, got


@glibc
@pytest.mark.parametrize("env", [{"MALLOC_MMAP_THRESHOLD_": "65536"},
                                 {"GLIBC_TUNABLES": "glibc.malloc.mmap_threshold=65536"}])
def test_tune_malloc_leaves_a_threshold_the_environment_chose(env):
    got = _child(**env)
    # 65536 stays: blocks under MALLOC_MMAP_THRESHOLD get mmaps of their own
    assert got["tuned"] is False and got["under"] >= 4 and got["over"] >= 4, got


def test_the_threshold_covers_what_a_stream_allocates():
    # the largest blocks of the upload path: a whole TLSStream.recv piece
    # (plus a record) and uvloop's 256,000-byte reads
    assert MALLOC_MMAP_THRESHOLD >= _streams.RECV_SIZE + 16 * 1024 and MALLOC_MMAP_THRESHOLD >= 256_000
