"""The one place that decides whether bitsandbytes can quantize to 4-bit here, with an error that says how to fix it."""

from __future__ import annotations

import importlib
import importlib.metadata
from functools import lru_cache
from types import ModuleType

import torch
from packaging.version import Version

BITSANDBYTES_MIN_VERSION = "0.48"
"""Oldest bitsandbytes with the device-agnostic (`torch.library`) 4-bit ops mm-trainer relies on."""

BITSANDBYTES_CPU_TESTED = "0.50.2"
"""bitsandbytes release whose CPU wheel we measured running nf4 `Linear4bit` forward and backward."""

INSTALL_HINT = (
    f'pip install "bitsandbytes>={BITSANDBYTES_MIN_VERSION}" (on CPU: bitsandbytes>={BITSANDBYTES_MIN_VERSION}, tested '
    f"with {BITSANDBYTES_CPU_TESTED}; on CUDA: a wheel built for your CUDA version)"
)


class BitsAndBytesUnavailableError(ImportError):
    """bitsandbytes is missing, too old, or cannot quantize on the device the model trains on."""


def _import_bitsandbytes() -> ModuleType:
    return importlib.import_module("bitsandbytes")


@lru_cache(maxsize=8)
def _check_device(device_type: str) -> None:
    """Quantize and dequantize one nf4 block on `device_type`: the cheapest proof that the backend works there."""
    import bitsandbytes.functional as bnb_functional

    probe = torch.linspace(-1.0, 1.0, 128, device=device_type).reshape(2, 64)
    packed, state = bnb_functional.quantize_4bit(probe, blocksize=64, quant_type="nf4", compress_statistics=True)
    restored = bnb_functional.dequantize_4bit(packed, state)
    error = (restored.reshape(probe.shape) - probe).abs().max().item() if restored.numel() == probe.numel() else None
    if error is None or not error < 0.25:  # nf4's widest gap (0.72 .. 1.0) bounds the error by 0.14 here
        raise RuntimeError(f"nf4 round trip on {device_type} is wrong (shape {tuple(restored.shape)}, error {error})")


def require_bitsandbytes(device: torch.device | str | None = None) -> ModuleType:
    """Import bitsandbytes and check it can quantize to nf4 on `device`.

    Args:
        device: Where the 4-bit layers will live (`"cpu"`, `"cuda"`, ...). `None` checks the import and version
            only.

    Returns:
        The `bitsandbytes` module.

    Raises:
        BitsAndBytesUnavailableError: bitsandbytes is not installed, older than [`BITSANDBYTES_MIN_VERSION`], or
            fails a one-block nf4 round trip on `device`; the message names the fix.
    """
    why = "`quantization` needs bitsandbytes for nf4 4-bit layers"
    try:
        bnb = _import_bitsandbytes()
    except Exception as err:  # ImportError, or a broken native library raising anything at import
        raise BitsAndBytesUnavailableError(
            f"{why}, but it cannot be imported ({type(err).__name__}: {err}). Install it: {INSTALL_HINT}; or unset "
            "`quantization` to train in full precision."
        ) from err
    version = getattr(bnb, "__version__", None) or importlib.metadata.version("bitsandbytes")
    if Version(version) < Version(BITSANDBYTES_MIN_VERSION):
        raise BitsAndBytesUnavailableError(f"{why}; bitsandbytes {version} is too old. Upgrade: {INSTALL_HINT}.")
    if device is not None:
        device_type = torch.device(device).type
        try:
            _check_device(device_type)
        except Exception as err:
            raise BitsAndBytesUnavailableError(
                f"{why}, but bitsandbytes {version} cannot quantize on {device_type} ({type(err).__name__}: {err}). "
                f"Install a build for this device: {INSTALL_HINT}; or unset `quantization`."
            ) from err
    return bnb


def bitsandbytes_available(device: torch.device | str | None = None) -> bool:
    """Whether [`require_bitsandbytes`] would succeed for `device`."""
    try:
        require_bitsandbytes(device)
    except BitsAndBytesUnavailableError:
        return False
    return True
