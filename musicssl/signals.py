"""Stop signals of the `musicssl` command: Ctrl-C, and the SIGTERM that a batch scheduler (SLURM at a
time limit or on preemption) or torchrun sends some seconds before it kills.

Each raises KeyboardInterrupt, and is recorded in `received`. The record matters because a
KeyboardInterrupt can be lost: Python prints and drops one raised while it runs a finaliser
(soundfile's `SoundFile.__del__`, say), and torch's C start-up drops one that lands during
`import torch`. Long loops call `check()`, so a lost one still stops the work within a step
instead of after hours of it.
"""

from __future__ import annotations

import contextlib
import signal
import sys
import threading
from collections.abc import Iterator
from typing import Any

# The signals caught, what the command's last line calls each, and its exit status (as a shell's).
STOP_SIGNALS = {signal.SIGINT: ("interrupted", 130), signal.SIGTERM: ("terminated (SIGTERM)", 143)}

received: list[int] = []  # STOP_SIGNALS seen since `catch()`, in order
_holding = [0]  # > 0 inside `held()`: a signal is recorded, and raised at the next `check()`


def catch() -> list[int]:
    """Make STOP_SIGNALS raise KeyboardInterrupt and record each in `received` (returned).

    SIGTERM would otherwise end the process at once, skipping the run's cleanup and last lines. A
    signal with a handler of the caller's own, or ignored (as under nohup), is left alone, and so is
    everything when this is not the main thread.
    """
    if threading.current_thread() is not threading.main_thread():
        return received

    def on_signal(signum: int, frame: Any) -> None:
        received.append(signum)
        if not _holding[0]:
            raise KeyboardInterrupt

    def quiet(unraisable: Any, hook: Any = sys.unraisablehook) -> None:
        if not isinstance(unraisable.exc_value, KeyboardInterrupt):  # that one, the command reports
            hook(unraisable)

    defaults = {signal.SIGINT: signal.default_int_handler, signal.SIGTERM: signal.SIG_DFL}
    caught = [sig for sig, default in defaults.items() if signal.getsignal(sig) is default]
    for sig in caught:
        signal.signal(sig, on_signal)
    if caught:
        sys.unraisablehook = quiet
    return received


@contextlib.contextmanager
def held() -> Iterator[None]:
    """Hold stop signals back until the next `check()`: for work that must finish whole, such as a
    training step whose optimiser state a checkpoint saves."""
    _holding[0] += 1
    try:
        yield
    finally:
        _holding[0] -= 1


def check() -> None:
    """Raise KeyboardInterrupt if a stop signal has arrived (its own KeyboardInterrupt may have been lost)."""
    if received:
        raise KeyboardInterrupt
