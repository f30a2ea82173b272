"""musicssl: self-supervised music audio encoders for PyTorch.

    enc = musicssl.load()             # the embedded default; or a name, "hf-hub:org/repo", a folder
    out = enc.embed("song.flac")      # out.frames (B, T, D), out.timestamps (T,) s, out.clip (B, D)

The public API is imported lazily so `import musicssl` costs little beyond `import torch`.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0.dev0"

_API = {
    "load": "musicssl.factory",
    "save_pretrained": "musicssl.factory",
    "list_models": "musicssl.registry",
    "model_info": "musicssl.registry",
    "ModelSpec": "musicssl.registry",
    "Embeddings": "musicssl.models.base",
    "Encoder": "musicssl.models.base",
    "extract": "musicssl.bulk",
    "ExtractResult": "musicssl.bulk",
    "errors": "musicssl.errors",
}

__all__ = ["__version__", *_API]


def __getattr__(name: str) -> Any:
    if name not in _API:
        raise AttributeError(f"module 'musicssl' has no attribute {name!r}")
    module = importlib.import_module(_API[name])
    value = module if name == "errors" else getattr(module, name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(__all__)
