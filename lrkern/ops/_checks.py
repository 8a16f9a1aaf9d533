"""Argument validation shared by the registered ops. Errors name the argument, the value and what is accepted."""
from __future__ import annotations

import torch

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
DEVICE_TYPES = ("cpu", "cuda")


def _dtypes(dtypes) -> str:
    return ", ".join(str(d).removeprefix("torch.") for d in dtypes)


def tensor(name: str, t, dtypes=FLOAT_DTYPES, min_dim: int = 1) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in dtypes:
        raise TypeError(f"{name} has dtype {t.dtype}; accepted: {_dtypes(dtypes)}")
    if t.dim() < min_dim:
        raise ValueError(f"{name} must have at least {min_dim} dim(s), got shape {tuple(t.shape)}")
    if t.device.type not in DEVICE_TYPES:
        raise ValueError(f"{name} is on {t.device}; accepted devices: {', '.join(DEVICE_TYPES)}")


def integer(name: str, value, accepted=None, minimum: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__} {value!r}")
    if accepted is not None and value not in accepted:
        raise ValueError(f"{name}={value} is not supported; accepted: {', '.join(map(str, accepted))}")
    if minimum is not None and value < minimum:
        raise ValueError(f"{name}={value} must be >= {minimum}")
    return value


def same_device(**tensors: torch.Tensor) -> None:
    devices = {name: t.device for name, t in tensors.items()}
    if len(set(devices.values())) > 1:
        listing = ", ".join(f"{n} on {d}" for n, d in devices.items())
        raise ValueError(f"tensors must be on one device: {listing}")


def power_of_two(name: str, value: int, lo: int, hi: int) -> None:
    if value < lo or value > hi or value & (value - 1):
        raise ValueError(f"{name}={value} must be a power of two in [{lo}, {hi}]")
