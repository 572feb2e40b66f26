"""Text path (paper eq. 4): frozen word vectors -> stacked SRU -> output at the last real token -> l2."""
from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F
from torch import nn

from models.sru_recurrence import sru_class, use_pytorch_recurrence


class TextEncoder(nn.Module):
    """Eq. 4: y = l2(SRU(w_1..w_T)[T]), T the last real token of each caption.

    The SRU is built as in the original release (v1 parametrisation, tanh, skip term, no rescale), so its
    state dict keys are ``rnn.rnn_lst.{i}.weight|weight_c|bias|scale_x``. Both dropouts draw one mask per caption,
    shared by all its time steps, and act in training mode only: ``dropout`` on g(c_t) in every layer but the last,
    ``rnn_dropout`` on the input of every layer, the word vectors included (sru also scales the initial weights by
    sqrt(1 - p) for each). The original set both to 0.25 with sru 2.1; sru 2.6 keeps both with that meaning.
    """

    def __init__(self, word_dim: int, embed_dim: int, layers: int, dropout: float, rnn_dropout: float = 0.0,
                 forget_bias: float = 0.0) -> None:
        super().__init__()
        sru, cuda_kernel = sru_class()
        with warnings.catch_warnings():
            # use_tanh and rnn_dropout are deprecated in sru 2.x, but they are the paper's
            warnings.simplefilter("ignore", UserWarning)
            self.rnn = sru(word_dim, embed_dim, num_layers=layers, dropout=dropout, rnn_dropout=rnn_dropout,
                           use_tanh=True, has_skip_term=True, rescale=False, v1=True)
        if not cuda_kernel:
            use_pytorch_recurrence(self.rnn)
        for layer in self.rnn.rnn_lst:
            # bias = [forget gates | reset gates]; sru initialises both to 0, so that f = 1/2 and the state
            # halves at every token: a positive forget bias lets the last state remember the first words
            layer.bias.data[:embed_dim] = forget_bias

    def forward(self, words: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """words: (B, T, word_dim) right-padded; lengths: (B,) >= 1 -> (B, d) unit vectors."""
        if bool((lengths < 1).any()):
            raise ValueError("every caption needs at least one token")
        with warnings.catch_warnings():
            # sru warns on every CPU forward with gradients: training on the CPU (the demo, the tests) runs its
            # pure-Python recurrence on purpose
            warnings.filterwarnings("ignore", message="Running SRU on CPU with grad_enabled=True")
            outputs, _ = self.rnn(words.transpose(0, 1))  # (T, B, d)
        batch = torch.arange(words.shape[0], device=words.device)
        last = outputs[lengths.to(words.device) - 1, batch]  # (B, d)
        return F.normalize(last.float(), dim=-1)  # fp32 norm under AMP
