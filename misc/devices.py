"""Where and in what precision a command runs: ``--device auto|cpu|cuda`` and ``--amp bf16|fp16``."""
from __future__ import annotations

import contextlib

import torch

from misc.errors import UserError

AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def resolve_device(name: str) -> torch.device:
    """``auto`` picks CUDA when available; asking for CUDA without it is a clear error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UserError("--device cuda asked for, but no CUDA device is available; use --device cpu")
    return torch.device(name)


def autocast(device: torch.device, amp: str | None) -> contextlib.AbstractContextManager:
    """Mixed precision: ``amp`` is None, 'bf16' (CUDA or CPU) or 'fp16' (CUDA only: a clear error on the CPU)."""
    if amp is None:
        return contextlib.nullcontext()
    if device.type != "cuda" and amp != "bf16":
        raise UserError(f"--amp {amp} needs CUDA; on the CPU use --amp bf16 or no --amp")
    return torch.autocast(device.type, dtype=AMP_DTYPES[amp])
