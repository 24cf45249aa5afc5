"""-n/--num-device-layers placement (backends/placement.py), on the CPU: which layer goes where,
clamping with one warning line, where the hidden state crosses devices, and how weights move.
(tests/test_cuda_e2e.py runs placed models: tokens, transfers counted, the meta-device check.)"""
from __future__ import annotations

import torch
from torch import nn

from mistralrs_cli.backends.placement import move_module, place_layers
from mistralrs_cli.models.layers import RMSNorm


def test_first_n_layers_on_the_device():
    p = place_layers(4, 2)
    assert p.layers == ("cuda", "cuda", "cpu", "cpu") and p.warning is None and p.n_device == 2
    assert (p.embed, p.head) == ("cpu", "cpu")  # embeddings always on the CPU
    assert p.boundaries == [0, 2]  # in before layer 0, out before layer 2


def test_all_and_none():
    assert place_layers(3, None).layers == ("cuda",) * 3
    full = place_layers(3, 3)
    assert (full.embed, full.head, full.boundaries, full.warning) == ("cpu", "cuda", [0], None)
    zero = place_layers(3, 0)
    assert zero.layers == ("cpu",) * 3 and (zero.embed, zero.head) == ("cpu", "cpu") and zero.boundaries == []


def test_clamped_with_a_warning():
    p = place_layers(2, 10)
    assert p.layers == ("cuda", "cuda") and p.head == "cuda"
    assert "10" in p.warning and "2 layers" in p.warning and "\n" not in p.warning
    neg = place_layers(2, -1)
    assert neg.layers == ("cpu", "cpu") and "negative" in neg.warning


def test_move_module_makes_new_tensors_and_leaves_tied_weights():
    """A head tied to the embedding moves without taking the embedding along; a norm's cached
    scale is rebuilt on the new device; plain tensor attributes move too."""
    emb = nn.Embedding(5, 4)
    head = nn.Linear(4, 5, bias=False)
    head.weight = emb.weight  # tied: one Parameter object
    norm = RMSNorm(4, 1e-5)
    norm(torch.ones(1, 4))  # caches its scale
    holder = nn.Module()
    holder.factors = torch.ones(3)
    for m in (head, norm, holder):
        move_module(m, torch.device("meta"))
    assert head.weight.is_meta and not emb.weight.is_meta
    assert isinstance(head.weight, nn.Parameter) and not head.weight.requires_grad
    assert norm.weight.is_meta and norm._scale is None and norm(torch.ones(1, 4, device="meta")).is_meta
    assert holder.factors.is_meta
