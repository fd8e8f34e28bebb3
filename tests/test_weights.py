"""Weight patches restore bit-exactly in any order."""

from __future__ import annotations

import itertools

import pytest
import torch

from sdxl_control.weights import WeightPatch


@pytest.mark.parametrize("order", list(itertools.permutations(range(3))))
def test_any_restore_order_is_exact(order):
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 2))
    original = [p for p in model.parameters()]
    values = [p.detach().clone() for p in original]
    g = torch.Generator().manual_seed(0)
    deltas = [
        {"0.weight": torch.randn(4, 4, generator=g)},
        {"0.weight": torch.randn(4, 4, generator=g), "1.bias": torch.randn(2, generator=g)},
        {"1.weight": torch.randn(2, 4, generator=g)},
    ]
    addresses = [p.data_ptr() for p in original]
    patches = [WeightPatch(model, d) for d in deltas]
    # In place: same objects at the same addresses while patched (compiled and CUDA graphs stay valid).
    assert [p for p in model.parameters()] == original
    assert [p.data_ptr() for p in model.parameters()] == addresses
    torch.testing.assert_close(model[0].weight, values[0] + deltas[0]["0.weight"] + deltas[1]["0.weight"])
    for i in order:
        patches[i].restore()
    assert [p for p in model.parameters()] == original  # the very same Parameter objects
    assert all(torch.equal(p, v) for p, v in zip(model.parameters(), values, strict=True))


def test_failed_patch_leaves_nothing():
    model = torch.nn.Linear(4, 4)
    before = model.weight
    with pytest.raises(ValueError, match="patch of shape"):
        WeightPatch(model, {"weight": torch.zeros(4, 4), "bias": torch.zeros(3)})
    assert model.weight is before
