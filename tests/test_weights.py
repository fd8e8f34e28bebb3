"""Weight patches restore bit-exactly in any order."""

from __future__ import annotations

import itertools

import pytest
import torch

from sdxl_control.weights.patches import WeightPatch


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


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_low_rank_deltas_add_the_same_bits_as_their_products_and_hold_only_factors(dtype):
    """A LoRA's factors (linear, and a convolution's kxk down with its 1x1 up) patch a weight exactly as the dense
    ``scale * up @ down`` does; the patch keeps the factors, not the product, and comes off exactly."""
    from sdxl_control.weights.patches import _SLOTS, LowRankDelta

    g = torch.Generator().manual_seed(3)
    model = torch.nn.Sequential(torch.nn.Linear(32, 24), torch.nn.Conv2d(8, 16, 3)).to(dtype)
    values = [p.detach().clone() for p in model.parameters()]
    low = {"0.weight": LowRankDelta(torch.randn(24, 4, generator=g), torch.randn(4, 32, generator=g), 0.35),
           "1.weight": LowRankDelta(torch.randn(16, 2, 1, 1, generator=g), torch.randn(2, 8, 3, 3, generator=g), 1.0)}  # fmt: skip
    dense = {
        "0.weight": (low["0.weight"].up @ low["0.weight"].down) * 0.35,
        "1.weight": (low["1.weight"].up.flatten(1) @ low["1.weight"].down.flatten(1)).reshape(16, 8, 3, 3),
    }
    assert low["1.weight"].shape == model[1].weight.shape
    by_product = WeightPatch(model, dense)
    expected = [p.detach().clone() for p in model.parameters()]
    by_product.restore()
    patch = WeightPatch(model, low)
    assert all(torch.equal(p, e) for p, e in zip(model.parameters(), expected, strict=True))
    held = [d for layer in model for slot in _SLOTS[layer].values() for d in slot.deltas.values()]
    assert len(held) == 2 and all(isinstance(d, LowRankDelta) for d in held)
    patch.restore()
    assert all(torch.equal(p, v) for p, v in zip(model.parameters(), values, strict=True))
