"""Decoders that fail the way C libraries do, for tests/test_decoders.py. They run in decoding
processes, which import them by name (this folder is on the path pytest gives them)."""

from __future__ import annotations

import ctypes
import os
import signal
import time
from typing import Any

from musicssl.audio.worker import decode_one


def faulty(path: str, sample_rate: int) -> dict[str, Any]:
    """decode_one, except for files named crash* (a real segfault in C), killed* (SIGKILL, as the
    out-of-memory killer sends), hang* (never returns) and slow* (takes 2 s)."""
    name = os.path.basename(path)
    if name.startswith("crash"):
        ctypes.string_at(0)  # reads address 0
    if name.startswith("killed"):
        os.kill(os.getpid(), signal.SIGKILL)
    if name.startswith("hang"):
        time.sleep(3600)
    if name.startswith("slow"):
        time.sleep(2.0)
    return decode_one(path, sample_rate)
