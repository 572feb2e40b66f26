"""The PyTorch SRU recurrence of a GPU without sru's CUDA kernel (models/sru_recurrence.py), against sru's own CPU
paths: its compiled CPU kernel (inference) and its autograd recurrence (training), forward and backward."""
from __future__ import annotations

import copy
import logging

import pytest
import torch

from models import sru_recurrence, text
from models.sru_recurrence import sru_class, use_pytorch_recurrence
from models.text import TextEncoder


def sru_pair(v1: bool, rescale: bool) -> tuple[torch.nn.Module, torch.nn.Module]:
    """Two identical 2-layer SRUs (6 -> 5: the first layer has k = 4, the second k = 3); the second routed through
    the PyTorch recurrence on the CPU, as it would be on a GPU without the kernel."""
    torch.manual_seed(0)
    sru, _ = sru_class()
    with pytest.warns(UserWarning):  # use_tanh and rnn_dropout are deprecated in sru 2.x
        reference = sru(6, 5, num_layers=2, dropout=0.3, rnn_dropout=0.2, use_tanh=True, has_skip_term=True,
                        rescale=rescale, v1=v1)
    for layer in reference.rnn_lst:  # non-zero recurrent weights and biases, so every term of the recurrence counts
        layer.weight_c.data.uniform_(-0.5, 0.5)
        layer.bias.data.uniform_(-0.5, 0.5)
    routed = copy.deepcopy(reference)
    use_pytorch_recurrence(routed)
    return reference, routed


@pytest.mark.parametrize("v1, rescale", [(True, False), (False, True)], ids=["paper", "v2_rescaled"])
def test_pytorch_recurrence_equals_sru_forward_and_backward(v1, rescale, monkeypatch):
    reference, routed = sru_pair(v1, rescale)
    monkeypatch.setattr(sru_recurrence, "KERNEL_DEVICES", {"cpu"})
    words = torch.randn(7, 4, 6)  # (T, B, word_dim)
    reference.eval(), routed.eval()
    with torch.no_grad():  # sru's compiled CPU kernel
        torch.testing.assert_close(routed(words)[0], reference(words)[0], rtol=1e-5, atol=1e-6)
    reference.train(), routed.train()
    grads = []
    for model in (reference, routed):  # both dropouts on: the same masks from the same seed
        torch.manual_seed(1)
        inputs = words.clone().requires_grad_(True)
        outputs, last = model(inputs)
        (outputs.pow(2).sum() + last.sum()).backward()
        grads.append([outputs.detach(), last.detach(), inputs.grad,
                      *(p.grad for p in model.parameters() if p.requires_grad)])
    assert len(grads[0]) == len(grads[1]) > 3
    for mine, theirs in zip(grads[1], grads[0]):
        torch.testing.assert_close(mine, theirs, rtol=1e-5, atol=1e-6)


def test_a_failed_cuda_build_routes_the_text_path_through_pytorch(monkeypatch, caplog):
    """Simulated: sru's CUDA build failed, so the encoder's SRU layers take the PyTorch recurrence where sru would
    call its CUDA kernel (here the CPU stands for the GPU), with one warning line, and the same numbers."""
    sru, _ = sru_class()
    torch.manual_seed(2)
    plain = TextEncoder(word_dim=6, embed_dim=5, layers=2, dropout=0.0, rnn_dropout=0.0).eval()
    monkeypatch.setattr(text, "sru_class", lambda: (sru, False))
    fallback = TextEncoder(word_dim=6, embed_dim=5, layers=2, dropout=0.0, rnn_dropout=0.0).eval()
    fallback.load_state_dict(plain.state_dict())
    monkeypatch.setattr(sru_recurrence, "KERNEL_DEVICES", {"cpu"})
    sru_recurrence._warn_once.cache_clear()
    words, lengths = torch.randn(3, 4, 6), torch.tensor([4, 2, 1])
    with caplog.at_level(logging.WARNING, logger="models.sru_recurrence"), torch.no_grad():
        torch.testing.assert_close(fallback(words, lengths), plain(words, lengths), rtol=1e-5, atol=1e-6)
        fallback(words, lengths)
    assert [record.message.split(":")[0] for record in caplog.records] == [
        "sru's CUDA kernel did not compile (no CUDA compiler?)"]


def test_the_recurrence_refuses_what_it_does_not_cover():
    _, routed = sru_pair(True, False)
    cell = routed.rnn_lst[0]
    u = torch.zeros(2, 1, 5 * 4)
    with pytest.raises(ValueError, match="unidirectional"):
        sru_recurrence.recurrence(cell, u, cell.weight_c, torch.zeros(2, 1, 6), torch.zeros(1, 5), None, None,
                                  torch.zeros(2, 1))
