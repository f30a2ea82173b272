"""Shared fixtures. `fake_hub`: a loopback Hugging Face Hub that the real huggingface_hub talks to."""

from __future__ import annotations

import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

# tests/ is not a package: make its helper modules importable as `fakehub` from any test file.
_TESTS = str(Path(__file__).resolve().parent)
if _TESTS not in sys.path:
    sys.path.insert(0, _TESTS)

from fakehub import FakeHub  # noqa: E402


class _NoSleepTime:
    """Stands in for the `time` module inside huggingface_hub: records sleeps instead of waiting."""

    def __init__(self, sleeps: list[float]) -> None:
        self._sleeps = sleeps

    def sleep(self, seconds: float) -> None:
        self._sleeps.append(seconds)

    def __getattr__(self, name: str) -> Any:
        return getattr(time, name)


@pytest.fixture
def fake_hub(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeHub]:
    """A FakeHub with HF_ENDPOINT, the HF and musicssl caches pointed at it and at tmp_path.

    Offline switches are cleared. huggingface_hub's retry backoff (1+2+4+8+8 s when the server is
    down) is recorded in `hub.sleeps` instead of slept.
    """
    import huggingface_hub.file_download
    import huggingface_hub.utils._detect_agent
    import huggingface_hub.utils._http

    hub = FakeHub()
    no_sleep = _NoSleepTime(hub.sleeps)
    # Both modules call `time.sleep` on their own `time` name: _http between retries, file_download
    # between resumes of an interrupted body.
    monkeypatch.setattr(huggingface_hub.utils._http, "time", no_sleep)
    monkeypatch.setattr(huggingface_hub.file_download, "time", no_sleep)
    # huggingface_hub 2.4 fetches an "agent harness" list from its import-time endpoint once per
    # process when it first builds headers; an empty list in place keeps that off the network.
    monkeypatch.setattr(huggingface_hub.utils._detect_agent, "_registry", {"standardEnvVars": [], "harnesses": {}})
    monkeypatch.setenv("HF_ENDPOINT", hub.url)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf_home"))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf_home" / "hub"))
    monkeypatch.setenv("MUSICSSL_CACHE", str(tmp_path / "musicssl_cache"))
    for var in ("MUSICSSL_OFFLINE", "HF_HUB_OFFLINE"):
        monkeypatch.delenv(var, raising=False)
    try:
        yield hub
    finally:
        hub.close()
