"""Device names from users, checked before any model moves: musicssl's error, not torch's."""

from __future__ import annotations

import torch

from musicssl.errors import DeviceError


def check_device(device: str | torch.device | None) -> torch.device | None:
    """`device` as a torch.device (None stays None), or a DeviceError saying what this machine has."""
    if device is None:
        return None
    try:
        d = torch.device(device)
    except (RuntimeError, TypeError) as err:
        raise DeviceError(f"unknown device {device!r}: use {_choices()}") from err
    if d.type == "meta":  # shapes without data: a model there cannot embed anything
        raise DeviceError(f"device {str(device)!r} holds no data, so a model there cannot embed; use {_choices()}")
    if d.type == "cuda":
        _check_cuda(d, device)
    elif d.type == "mps" and not torch.backends.mps.is_available():
        raise DeviceError(f"device {device!r}: this machine or torch build has no MPS; use {_choices()}")
    return d


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def _check_cuda(d: torch.device, name: str | torch.device) -> None:
    if torch.version.cuda is None and torch.version.hip is None:
        raise DeviceError(
            f"device {str(name)!r}: this torch ({torch.__version__}) is a CPU-only build; use 'cpu', or "
            f"install a CUDA build of torch (https://pytorch.org/get-started/locally/)"
        )
    count = torch.cuda.device_count()
    if count == 0:
        raise DeviceError(f"device {str(name)!r}: torch sees no GPU here (check nvidia-smi and "
                          f"CUDA_VISIBLE_DEVICES); use 'cpu'")
    if d.index is not None and d.index >= count:
        raise DeviceError(f"device {str(name)!r}: this machine has {count} GPU(s), cuda:0 to cuda:{count - 1}")


def _choices() -> str:
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    names = ["'cpu'"] + (["'cuda'"] + [f"'cuda:{i}'" for i in range(min(gpus, 2))] if gpus else [])
    return ", ".join(names) + (" (this machine has no usable GPU)" if not gpus else "")
