"""glibc's malloc thresholds for ``cfl-sftp serve``: the buffers of SFTP replies stay in memory that is reused.

Every READ reply passes through several fresh buffers of about 256 KiB (the file's bytes, then asyncssh's SFTP
and SSH channel framing), and every MiB of an upload through one of 1 MiB (its WRITEs joined), each alive for
microseconds. glibc serves requests that large with ``mmap``, or, once
its dynamic threshold has risen past them, from the top of the heap, which it hands back to the kernel whenever
more than twice that threshold lies free there. Both ways the kernel maps and zeroes fresh pages for every reply:
a 1 GiB download took about a million page faults, and the kernel's share was two thirds of the server's CPU
(benchmarks/README.md). Fixed thresholds, set with ``mallopt(3)`` before the service starts, keep those buffers
on the heap and the heap's top mapped: allocations under :data:`MMAP_THRESHOLD_BYTES` come from the heap, and
free memory at its top is returned only beyond :data:`TRIM_THRESHOLD_BYTES`.

On another C library (musl, macOS) nothing is changed; the service works the same, with more kernel time.
"""

from __future__ import annotations

import ctypes
import platform

M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
"""mallopt(3)'s parameter numbers (glibc's malloc.h)."""

MMAP_THRESHOLD_BYTES = 4 << 20
"""Larger than any reply buffer (255 KiB of data plus framing) and than an upload's batch (1 MiB of WRITEs joined
into one piece, :data:`cfl_sftp.sftp.handles.UPLOAD_BATCH_BYTES`), well below what a policy load allocates at
once."""
TRIM_THRESHOLD_BYTES = 16 << 20
"""Free heap kept mapped at most: 200 sessions' replies in flight come and go within it."""


def keep_reply_buffers_on_the_heap() -> bool:
    """Set glibc's thresholds (see the module docstring); False where the C library is not glibc."""
    if platform.libc_ver()[0] != "glibc":
        return False
    mallopt = ctypes.CDLL(None).mallopt  # the process's own C library
    mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    mallopt.restype = ctypes.c_int
    return bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES)) and bool(mallopt(M_TRIM_THRESHOLD,
                                                                                    TRIM_THRESHOLD_BYTES))
