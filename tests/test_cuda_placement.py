"""-n/--num-device-layers placement (backends/placement.py), on the CPU: which layer goes where,
clamping with one warning line, and activations moved only at a device boundary."""
from __future__ import annotations

import torch

from mistralrs_cli.backends.placement import place_layers, to_layer


def test_first_n_layers_on_the_device():
    p = place_layers(4, 2)
    assert p.layers == ("cuda", "cuda", "cpu", "cpu") and p.warning is None
    assert (p.embed, p.head) == ("cuda", "cpu")
    assert p.boundaries == [2]


def test_all_and_none():
    assert place_layers(3, None).layers == ("cuda",) * 3
    full = place_layers(3, 3)
    assert (full.embed, full.head, full.boundaries, full.warning) == ("cuda", "cuda", [], None)
    zero = place_layers(3, 0)
    assert zero.layers == ("cpu",) * 3 and (zero.embed, zero.head) == ("cpu", "cpu") and zero.boundaries == []


def test_clamped_with_a_warning():
    p = place_layers(2, 10)
    assert p.layers == ("cuda", "cuda")
    assert "10" in p.warning and "2 layers" in p.warning and "\n" not in p.warning
    neg = place_layers(2, -1)
    assert neg.layers == ("cpu", "cpu") and "negative" in neg.warning


def test_activations_move_only_across_devices():
    p = place_layers(3, 1, device="meta")  # a second device type that exists without a GPU
    h = torch.ones(2, 4)
    assert to_layer(h, place_layers(3, 0), 0) is h
    moved = to_layer(h, p, 0)
    assert moved.device.type == "meta"
    assert to_layer(h, p, 1) is h and p.boundaries == [1]
