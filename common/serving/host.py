"""A serving process and its host: OpenMP waiting, huge pages, glibc's allocator, and dying with its launcher.

Everything here is measured on the tiers' workload (megabyte activations computed in bursts, with idle time in
between while the other tiers compute) and is applied by every tier process at start-up; the benchmarks apply the
same settings to their in-process reference, so that both sides of a comparison run on the same footing. An
explicit environment setting always wins. This module does not import torch: ``tune_environment`` has to run
first.
"""
from __future__ import annotations

import ctypes
import os
import signal
import sys

ENVIRONMENT = {
    # Tiers share a host's cores with each other and with their gRPC threads, and an OpenMP team that spin-waits
    # after each parallel region (the runtime's default) burns the cores the next tier needs while this one waits
    # for its answer. PASSIVE puts idle threads to sleep. Measured with launch_local on the demo bundle (2 cores,
    # torch's default threads): 869-933 -> 1,040 samples/s.
    "OMP_WAIT_POLICY": "PASSIVE",
    # Back tensors of 2 MB and more with transparent huge pages: PyTorch's CPU allocator asks for them (madvise)
    # when this is set, and a host whose THP mode is "madvise" gives none otherwise. Measured on a full-width
    # ResNet-18 in three processes, one torch thread each: the served device segment took 216 ms per batch of 64
    # with 4 KB pages against 170 ms in one process, and 182 ms with huge pages; serving_overhead's ratio was
    # 0.81-0.89 without, 0.89-0.91 with (alternating runs). No measurable effect on the width-0.25 demo model.
    "THP_MEM_ALLOC_ENABLE": "1",
}

PARENT_PID_ENV = "SPLITEXIT_PARENT_PID"
PR_SET_PDEATHSIG = 1
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD, M_ARENA_MAX = -1, -3, -8  # glibc mallopt parameters
KEEP_FREED_BYTES = 256 << 20


def tune_environment() -> None:
    """Set the ``ENVIRONMENT`` defaults that are not set yet. Only effective before torch is imported (its libraries
    read them once), so entry points call it before their other imports."""
    for name, value in ENVIRONMENT.items():
        os.environ.setdefault(name, value)


def keep_freed_memory() -> bool:
    """Let glibc keep freed memory for reuse instead of handing it back to the OS after every request, whichever
    thread frees and allocates it (Linux/glibc; call before the process starts its threads).

    A tier allocates megabytes of activations per request and frees them when it answers. With glibc's defaults
    those buffers are mmapped and unmapped, or the worker thread's heap is trimmed, every time, so each request
    page-faults (and zeroes) its tensors in again: measured here, the served tiers ran about a third slower than the
    same segments in one process. Serving large allocations from the heap and not trimming it keeps the resident
    size at its working-set peak instead. One arena for all threads: gRPC hands each request to any of its worker
    threads, and with an arena per thread every thread's first requests page-faulted a working set of their own
    (a full-width ResNet-18's served device segment took 170-435 ms per batch for its first dozen requests instead
    of 170). Returns whether the settings took."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None)
        return all([libc.mallopt(M_MMAP_THRESHOLD, KEEP_FREED_BYTES), libc.mallopt(M_TRIM_THRESHOLD, 4 * KEEP_FREED_BYTES),
                    libc.mallopt(M_ARENA_MAX, 1)])
    except (OSError, AttributeError):  # not glibc
        return False


def die_with_parent() -> None:
    """When started by a launcher (``SPLITEXIT_PARENT_PID`` set), get SIGTERM from the kernel if it dies (Linux).

    Done after exec rather than in a ``preexec_fn``: forking a threaded launcher and running Python before exec is
    unsafe. If the launcher already died before this ran, exit at once.
    """
    parent = os.environ.get(PARENT_PID_ENV)
    if not parent or not sys.platform.startswith("linux"):
        return
    try:
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    except (OSError, AttributeError):
        return
    if os.getppid() != int(parent):
        raise SystemExit(f"launcher {parent} is gone; not starting")
