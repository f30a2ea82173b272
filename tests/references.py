"""Reference (upstream) packages for the parity tests, importable next to torch 2.13 CPU.

The references are installed by the README's test command (`tests/requirements-reference.txt`,
with `--no-deps`, plus the `test` extra). Some import modules they never use on the path a parity
test takes (torchaudio's C++ extension, torchvision, Lightning, ...); `stub_module` registers a
minimal stand-in for those, and `torchaudio_python_only` makes torchaudio's pure-torch transforms
importable without its compiled extension, which has no build for torch 2.13.
"""

from __future__ import annotations

import importlib
import importlib.machinery
import importlib.util
import sys
import types
from typing import Any

import pytest

REFERENCE_HINT = (
    "install the parity references: pip install -e '.[test]' && "
    "pip install --no-deps -r tests/requirements-reference.txt"
)


def require(module: str) -> types.ModuleType:
    """Import a reference package, or skip with the command that installs it (CI installs it)."""
    return pytest.importorskip(module, reason=f"reference package {module!r} missing: {REFERENCE_HINT}")


def stub_module(name: str, **attrs: Any) -> types.ModuleType:
    """Register `name` (and its parents) in sys.modules as a bare module with `attrs`, unless a
    real module is already imported under that name. Returns the module in sys.modules."""
    parts = name.split(".")
    for i in range(1, len(parts) + 1):
        sub = ".".join(parts[:i])
        if sub not in sys.modules:
            mod = types.ModuleType(sub)
            mod.__path__ = []  # a package, so children can be registered below it
            # a spec, so importlib.util.find_spec(sub) answers instead of raising ValueError
            mod.__spec__ = importlib.machinery.ModuleSpec(sub, None, is_package=True)
            sys.modules[sub] = mod
            if i > 1:
                setattr(sys.modules[".".join(parts[:i - 1])], parts[i - 1], mod)
    mod = sys.modules[name]
    for key, value in attrs.items():
        if not hasattr(mod, key):
            setattr(mod, key, value)
    return mod


def torchaudio_python_only() -> types.ModuleType:
    """Import the installed torchaudio with its compiled extension stubbed out (transforms such as
    MelSpectrogram and AmplitudeToDB are pure torch and work); skip if torchaudio is absent."""
    if "torchaudio" not in sys.modules:
        if importlib.util.find_spec("torchaudio") is None:
            pytest.skip(f"reference dependency 'torchaudio' missing: {REFERENCE_HINT}")
        ext = types.ModuleType("torchaudio._extension")
        ext._IS_TORCHAUDIO_EXT_AVAILABLE = False
        ext._IS_ALIGN_AVAILABLE = False
        ext.fail_if_no_align = lambda f: f
        sys.modules["torchaudio._extension"] = ext
    return importlib.import_module("torchaudio")


def rel_err(ours: Any, ref: Any) -> float:
    """||ours - ref|| / ||ref|| in float64."""
    import torch

    ours = torch.as_tensor(ours).detach().double()
    ref = torch.as_tensor(ref).detach().double()
    assert ours.shape == ref.shape, f"shape {tuple(ours.shape)} vs reference {tuple(ref.shape)}"
    return float((ours - ref).norm() / ref.norm().clamp_min(1e-30))


def randomize_(module: Any, seed: int = 0, scale: float = 0.05) -> Any:
    """Overwrite every parameter and BatchNorm running statistic of `module` with seeded noise
    (norm weights around 1, variances positive), so no branch is silently zero- or identity-
    initialised. Other buffers (windows, filterbanks, masks) are deterministic and kept."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        stats = [(n, b) for n, b in module.named_buffers() if n.endswith(("running_mean", "running_var"))]
        trained = [(n, p) for n, p in module.named_parameters() if p.requires_grad]  # frozen = deterministic
        for name, t in trained + stats:
            if not t.is_floating_point():
                continue
            noise = torch.randn(t.shape, generator=gen, dtype=torch.float64).to(t.dtype)
            if name.endswith("running_var"):
                t.copy_(1.0 + 0.5 * noise.abs())
            elif _is_norm_weight(name, t):
                t.copy_(1.0 + scale * noise)
            else:
                t.copy_(scale * noise)
    return module


def _is_norm_weight(name: str, t: Any) -> bool:
    leaf = name.rsplit(".", 2)
    return t.dim() == 1 and leaf[-1] == "weight" and any(k in name for k in ("norm", "bn", "ln"))


def padded(items: list) -> tuple:
    """1-D float32 arrays -> (wav (B, max S) zero-padded, lengths (B,)), a batch for forward_features."""
    import torch

    wav = torch.zeros(len(items), max(len(x) for x in items))
    for i, x in enumerate(items):
        wav[i, : len(x)] = torch.as_tensor(x)
    return wav, torch.tensor([len(x) for x in items])
