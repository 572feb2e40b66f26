"""The SRU's elementwise recurrence in plain PyTorch, for a GPU where sru's CUDA kernel did not compile.

sru compiles its CUDA kernel on first import. Without a CUDA compiler (pip-installed torch, no ``nvcc``) that build
fails, sru only warns and loads a stand-in whose every call raises, and the first CUDA forward of the text path
would fail deep inside sru. :func:`sru_class` notes the failed build; :func:`use_pytorch_recurrence` then gives
each SRU layer this recurrence for CUDA tensors (CPU tensors keep sru's own path): the same sums as sru's kernels
(tests/test_models.py compares forward and backward with sru's CPU paths), one Python step per token, so slower.

For one unidirectional layer with hidden size d, U (T, B, d, k) from the layer's matrix product (it may come as
T x B rows of d k columns), x the layer's input, v_f, v_r (d,) its recurrent weights (0 in the v1
parametrisation) and b_f, b_r its biases:

    f_t = sigmoid(U_t[1] + b_f + v_f * c_{t-1})        r_t = sigmoid(U_t[2] + b_r + v_r * c_{t-1})
    c_t = U_t[0] + (c_{t-1} - U_t[0]) * f_t           h_t = x'_t + (g(c_t) - x'_t) * m * r_t

with g = tanh (or the identity), m the layer's dropout mask on g(c_t) - x'_t, x'_t the skip term: x_t (times
``scale_x``) when k = 3, U_t[3] when k = 4 (input and hidden sizes differ), 0 without a skip term.
"""
from __future__ import annotations

import functools
import logging
import warnings
from collections.abc import Callable

import torch
from torch import nn

log = logging.getLogger(__name__)
FAILED_CUDA_BUILD = "Just-in-time loading and compiling the CUDA kernels of SRU was unsuccessful"
KERNEL_DEVICES = {"cuda"}  # where sru would call its compiled kernel


@functools.cache
def sru_class() -> tuple[type[nn.Module], bool]:
    """sru's ``SRU`` and whether its CUDA kernel compiled, imported on first use: importing sru compiles its C++
    kernels (and tries CUDA's) into ``TORCH_EXTENSIONS_DIR`` (the CLIs and the Makefile point it inside the clone),
    so that waits until a text encoder is built. The build's warnings and log lines are kept out of the output
    (a machine without CUDA always fails the CUDA build); the failed build is remembered instead."""
    builder = logging.getLogger("torch.utils.cpp_extension")
    level = builder.level
    builder.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            from sru import SRU
    finally:
        builder.setLevel(level)
    return SRU, not any(FAILED_CUDA_BUILD in str(warning.message) for warning in caught)


def recurrence(cell: nn.Module, U: torch.Tensor, V: torch.Tensor, residual: torch.Tensor, c0: torch.Tensor,
               scale_x: torch.Tensor | None, mask_c: torch.Tensor | None,
               mask_pad: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """The recurrence of the module docstring for ``cell`` (an ``sru.SRUCell``) in the arguments of its
    ``apply_recurrence``: h (T, B, d) and the last state c (B, d)."""
    if cell.bidirectional or mask_pad is not None or V.dim() > 1:
        raise ValueError("the PyTorch SRU recurrence covers unidirectional layers without padding masks or custom "
                         "recurrent weights (the text path's)")
    length, batch, d = residual.shape[0], residual.shape[1], cell.hidden_size  # U may come flattened
    u = U.reshape(length, batch, d, -1)
    forget_w, reset_w = V.view(2, d)
    forget_b, reset_b = cell.bias.view(2, d)
    if not cell.has_skip_term:
        skip = None
    elif u.shape[-1] == 3:
        skip = residual.reshape(length, batch, d) * (scale_x if scale_x is not None else 1)
    else:
        skip = u[..., 3]
    forget_in, reset_in = u[..., 1] + forget_b, u[..., 2] + reset_b  # (T, B, d) each
    c, steps = c0.reshape(batch, d), []
    for t in range(length):
        forget = torch.sigmoid(forget_in[t] + c * forget_w)
        reset = torch.sigmoid(reset_in[t] + c * reset_w)
        c = u[t, :, :, 0] + (c - u[t, :, :, 0]) * forget
        g = torch.tanh(c) if cell.activation_type == 1 else c
        gated = g if skip is None else g - skip[t]
        gated = (gated if mask_c is None else gated * mask_c) * reset
        steps.append(gated if skip is None else skip[t] + gated)
    return torch.stack(steps), c


def use_pytorch_recurrence(rnn: nn.Module) -> None:
    """Route every layer of the ``sru.SRU`` ``rnn`` through :func:`recurrence` on the devices of
    :data:`KERNEL_DEVICES`, saying so once per process when it first runs."""
    for cell in rnn.rnn_lst:
        cell.apply_recurrence = functools.partial(_routed, cell, cell.apply_recurrence)


def _routed(cell: nn.Module, kernel: Callable, U: torch.Tensor, *rest: torch.Tensor | None) -> tuple:
    if U.device.type not in KERNEL_DEVICES:
        return kernel(U, *rest)
    _warn_once()
    return recurrence(cell, U, *rest)


@functools.cache
def _warn_once() -> None:
    log.warning("sru's CUDA kernel did not compile (no CUDA compiler?): the SRU runs a plain PyTorch recurrence on "
                "the GPU, slower; install the CUDA toolkit matching torch's CUDA (nvcc) for sru's kernel")
