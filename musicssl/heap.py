"""Host memory reuse for long jobs: keep freed tensors' pages instead of faulting fresh ones in.

glibc's malloc trims freed memory off the top of its heap once more than twice its (moving) mmap
threshold is free there, and hands blocks above that threshold to mmap. A model's activations are
tens of MB, so on CPU every batch faulted fresh pages in: 52 000 page faults (215 MB) per `embed()` of
4 minutes of audio with the default model, and 16 % of its wall time here (median of 8 alternated
runs: 0.84 s per call, 0.70 s with the settings below).

This is process-wide, so the `musicssl` command sets it (its process is ours), and library calls do
not. Python users running long CPU jobs can call `keep_freed_memory()` themselves.
"""

from __future__ import annotations

import ctypes
import platform

# mallopt parameters (glibc malloc.h).
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3

# Blocks above glibc's own ceiling for its moving threshold still go to mmap and back, so that the
# heap does not fragment around a large model's biggest activations (1 GiB here held MERT-95M at
# 6.8 GB resident after use, against 0.7 GB).
MMAP_BYTES = 32 << 20
KEEP_BYTES = 256 << 20  # free memory kept on top of the heap for the next batch


def keep_freed_memory(keep: int = KEEP_BYTES) -> bool:
    """Keep up to `keep` bytes of freed heap memory for reuse, and serve blocks up to 32 MiB from the heap.

    Returns whether the setting took: False off glibc (macOS, Windows, musl), where nothing changes.
    The resident set may stay up to `keep` bytes above what is in use.
    """
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    # Setting either fixes the mmap threshold (glibc stops moving it), so both are set.
    return bool(mallopt(_M_MMAP_THRESHOLD, MMAP_BYTES)) and bool(mallopt(_M_TRIM_THRESHOLD, keep))
