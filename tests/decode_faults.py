"""Decoders that fail the way C libraries do, for tests/test_decoders.py. They run in decoding
processes, which import them by name (this folder is on the path pytest gives them)."""

from __future__ import annotations

import ctypes
import fcntl
import os
import signal
import time
from typing import Any

from musicssl.audio.worker import decode_one


def faulty(path: str, sample_rate: int) -> dict[str, Any]:
    """decode_one, except for files named crash* (a real segfault in C), killed* (SIGKILL, as the
    out-of-memory killer sends), hang* (never returns), slow* (takes 2 s), lag*
    (takes 50 ms) and serial* (takes 50 ms, one at a time across processes, as on one slow disk)."""
    name = os.path.basename(path)
    if name.startswith("crash"):
        ctypes.string_at(0)  # reads address 0
    if name.startswith("killed"):
        os.kill(os.getpid(), signal.SIGKILL)
    if name.startswith("hang"):
        time.sleep(3600)
    if name.startswith("slow"):
        time.sleep(2.0)
    if name.startswith("lag"):
        time.sleep(0.05)
    if name.startswith("serial"):
        with open(os.path.join(os.path.dirname(path), ".serial.lock"), "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            time.sleep(0.05)
    return decode_one(path, sample_rate)
