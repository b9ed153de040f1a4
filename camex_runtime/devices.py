"""Where tensors go: a device name checked against this machine before anything is loaded.

`torch.device("cuda")` is accepted by a CPU-only torch build; the failure comes later, from
the first tensor moved there, and reads like a broken file ("Torch not compiled with CUDA
enabled" inside a safetensors error). `check_device` says what is missing up front.
"""
from __future__ import annotations

import torch


def check_device(device: str | torch.device) -> torch.device:
    """`device` as a torch.device; ValueError naming why this machine cannot use it."""
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise ValueError(f"device {str(device)!r} is not a torch device ({exc})") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            why = ("this torch build has no CUDA support" if torch.version.cuda is None
                   else "no CUDA device is visible (CUDA_VISIBLE_DEVICES, driver)")
            raise ValueError(f"device {str(device)!r}: {why} (torch {torch.__version__}); "
                             "use the cpu device")
        count = torch.cuda.device_count()
        if dev.index is not None and dev.index >= count:
            raise ValueError(f"device {str(device)!r}: only {count} CUDA device(s) visible "
                             f"(cuda:0 to cuda:{count - 1})")
    elif dev.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"device {str(device)!r}: MPS is not available on this machine")
    return dev  # (other kinds are torch's to check)
