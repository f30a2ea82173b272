"""Serve upstream-format files on the fake Hub and load them through a registry name.

`load_through_hub` checks the whole path a user of an upstream port takes: `musicssl.load(NAME)`
downloads the files under the upstream repo id and file names, converts them, caches the result;
a second load makes zero requests and unpickles nothing.
"""

from __future__ import annotations

import dataclasses
import hashlib
import pickle
from typing import Any

import pytest
import torch

import musicssl
from musicssl import registry


def pin_to_fake_hub(fake_hub: Any, monkeypatch: pytest.MonkeyPatch, name: str, files: dict[str, bytes],
                    args: dict[str, Any] | None = None) -> registry.ModelSpec:
    """Publish `files` on the fake Hub under `name`'s upstream repo (or URL) and point the registry
    entry's pins (revision, sha256s) -- and, for a small test model, its `args` -- at them."""
    spec, build = registry._lookup(name)
    shas = {n: hashlib.sha256(data).hexdigest() for n, data in files.items()}
    if spec.weights.startswith("hf-hub:"):
        repo_id = spec.weights[len("hf-hub:"):].split("@")[0]
        commit = fake_hub.add_repo(repo_id, files)
        new = dataclasses.replace(spec, revision=commit, files=shas, args=args or spec.args)
    else:
        urls = {n: fake_hub.add_url_file(n, data) for n, data in files.items()}
        base = next(iter(urls.values())).rsplit("/", 1)[0]
        new = dataclasses.replace(spec, weights=base, files=shas, args=args or spec.args)
    monkeypatch.setitem(registry._MODELS, registry.canonical(name), (new, build))
    return new


def load_through_hub(fake_hub: Any, monkeypatch: pytest.MonkeyPatch, name: str, files: dict[str, bytes],
                     args: dict[str, Any] | None = None) -> tuple[musicssl.Encoder, musicssl.Encoder]:
    """(first load: download + convert, second load: from the converted cache). The second load is
    checked to make no request and to call neither torch.load nor pickle."""
    pin_to_fake_hub(fake_hub, monkeypatch, name, files, args)
    first = musicssl.load(name)
    assert fake_hub.requests, "the first load should have downloaded from the (fake) Hub"
    fake_hub.clear_requests()

    def refuse(*_: Any, **__: Any) -> None:
        raise AssertionError("a cached converted model was unpickled again")

    with monkeypatch.context() as m:
        m.setattr(torch, "load", refuse)
        m.setattr(pickle, "load", refuse)
        m.setattr(pickle, "loads", refuse)
        second = musicssl.load(name)
    assert fake_hub.requests == [], f"the second load made requests: {fake_hub.requests}"
    return first, second
