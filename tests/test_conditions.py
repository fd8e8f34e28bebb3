"""The condition protocol: attach/detach is total, windows and stages behave, failures leave nothing behind."""

from __future__ import annotations

import pytest
import torch

from sdxl_control import ConditionError, Generator, SdxlControlError, Stage, Window
from sdxl_control.protocol.attach import ModelSnapshot

from .probe import BaseOnlyProbe, Probe

ARGS = dict(steps=6, size=(64, 64), seed=5, progress_bar=False)


def hooks(module):
    return [(n, dict(m._forward_hooks), dict(m._forward_pre_hooks)) for n, m in module.named_modules()]


def assert_same_as_fresh(gen: Generator, fresh: Generator) -> None:
    for ours, ref in ((gen.base.unet, fresh.base.unet), (gen.refiner.unet, fresh.refiner.unet)):
        a, b = ours.state_dict(), ref.state_dict()
        assert a.keys() == b.keys()
        assert all(torch.equal(a[k], b[k]) for k in a)
        assert {k: type(v) for k, v in ours.attn_processors.items()} == {
            k: type(v) for k, v in ref.attn_processors.items()
        }
        assert hooks(ours) == hooks(ref)


def test_probe_acts_then_leaves_models_as_a_fresh_load(generator, fresh):
    before = ModelSnapshot.take(generator.base.unet)
    plain = generator.generate("a cat", **ARGS)
    probed = generator.generate(
        "a cat", conditions=[Probe(scale=0.5, stage=Stage.BOTH, residual=0.1)], refiner_switch=0.5, **ARGS
    )
    plain_refined = generator.generate("a cat", refiner_switch=0.5, **ARGS)
    assert not torch.allclose(probed.latents, plain_refined.latents)
    assert ModelSnapshot.take(generator.base.unet) == before
    assert_same_as_fresh(generator, fresh)
    assert torch.equal(generator.generate("a cat", **ARGS).latents, plain.latents)


def test_raise_mid_loop_restores_everything(generator, fresh):
    plain = generator.generate("a cat", refiner_switch=0.5, **ARGS)
    with pytest.raises(RuntimeError, match="boom"):
        generator.generate(
            "a cat",
            conditions=[Probe(stage=Stage.BOTH), Probe(raise_at=4, stage=Stage.BOTH)],
            refiner_switch=0.5,
            **ARGS,
        )
    assert_same_as_fresh(generator, fresh)
    assert torch.equal(generator.generate("a cat", refiner_switch=0.5, **ARGS).latents, plain.latents)


def test_failed_attach_detaches_the_ones_already_attached(generator, fresh):
    with pytest.raises(RuntimeError, match="attach failed"):
        generator.generate("a cat", conditions=[Probe(scale=0.3), Probe(fail_attach=True)], **ARGS)
    assert_same_as_fresh(generator, fresh)


def test_a_leaking_condition_is_reported(generator):
    with pytest.raises(SdxlControlError, match="did not restore the UNet's hooks"):
        generator.generate("a cat", conditions=[Probe(leak_hook=True)], **ARGS)
    for module in generator.base.unet.modules():  # undo the deliberate leak for the other tests
        module._forward_hooks.clear()


def test_scale_zero_is_the_same_as_absent(generator):
    plain = generator.generate("a cat", **ARGS)
    zero = generator.generate("a cat", conditions=[Probe(scale=0.0, residual=0.5)], **ARGS)
    assert torch.equal(zero.latents, plain.latents)


def test_window_outside_equals_plain_inside_differs(generator):
    def trace(conditions):
        seen = []
        generator.generate("a cat", conditions=conditions, progress=lambda e: seen.append(e.latents.clone()), **ARGS)
        return seen

    plain = trace([])
    late = trace([Probe(scale=0.8, window=(0.5, 1.0))])
    # 6 steps: steps 0-2 lie before the window and must be untouched; steps 3-5 inside must differ.
    for i in range(3):
        assert torch.equal(late[i], plain[i])
    assert not torch.allclose(late[3], plain[3])


def test_stages_are_honoured(generator):
    prepared = []
    original = Probe.prepare

    def spy(self, ctx):
        p = original(self, ctx)
        prepared.append(p)
        return p

    Probe.prepare = spy
    try:
        generator.generate("a cat", conditions=[Probe(stage=Stage.REFINER)], refiner_switch=0.5, **ARGS)
        generator.generate("a cat", conditions=[Probe(stage=Stage.BOTH)], refiner_switch=0.5, **ARGS)
    finally:
        Probe.prepare = original
    assert prepared[0].attached_stages == [Stage.REFINER]
    assert prepared[1].attached_stages == [Stage.BASE, Stage.REFINER]


def test_unsupported_stage_is_refused_before_running(generator):
    with pytest.raises(ConditionError, match="cannot apply to the refiner stage: it is trained for the base UNet"):
        generator.generate("a cat", conditions=[BaseOnlyProbe(stage="both")], refiner_switch=0.5, **ARGS)
    with pytest.raises(ConditionError, match="runs no refiner"):
        generator.generate("a cat", conditions=[Probe(stage="refiner")], **ARGS)


def test_condition_values_are_frozen_and_validated():
    probe = Probe(scale=0.5, window=(0.1, 0.9))
    assert probe.window == Window(0.1, 0.9)
    with pytest.raises(AttributeError):
        probe.scale = 1.0  # type: ignore[misc]
    with pytest.raises(ConditionError):
        Window(0.8, 0.2)
    assert probe.settings() == {
        "kind": "probe", "scale": 0.5, "window": [0.1, 0.9], "stage": "base",
        "raise_at": None, "fail_attach": False, "leak_hook": False, "residual": 0.0,
    }  # fmt: skip


def test_window_rule_matches_diffusers_control_guidance():
    # diffusers: keep = not (i / n < start or (i + 1) / n > end)
    for start, end in [(0.0, 1.0), (0.0, 0.7), (0.25, 0.75), (0.5, 1.0)]:
        for n in (4, 7, 30):
            for i in range(n):
                assert Window(start, end).contains(i, n) == (not (i / n < start or (i + 1) / n > end))


def test_parts_of_a_condition_switch_by_their_own_scale_and_window():
    """Parts (InstantID's face branch and IdentityNet) each act by their own scale and window, whatever the loop's
    flag for the condition as a whole; their residuals are summed and they detach in reverse order."""
    from sdxl_control import Attachment, Parts, Residuals, StepInfo

    log: list[tuple[str, int, bool]] = []

    class Recorder(Attachment):
        def __init__(self, name: str) -> None:
            self.name = name

        def contribute(self, step, active):
            log.append((self.name, step.index, active))
            return Residuals((torch.ones(1),), torch.ones(1)) if active else None

        def detach(self):
            log.append((self.name, -1, False))

    parts = Parts([(Recorder("a"), 0.8, Window(0.0, 0.5)), (Recorder("b"), 0.5, Window(0.5, 1.0)),
                   (Recorder("off"), 0.0, Window())])  # fmt: skip
    sums = []
    for index in range(4):
        step = StepInfo(index, 4, torch.zeros(()), Stage.BASE, torch.zeros(1), torch.zeros(1), {}, False)
        residuals = parts.contribute(step, active=False)
        sums.append(None if residuals is None else residuals.mid.item())
    parts.detach()
    assert [(n, i) for n, i, on in log if on] == [("a", 0), ("a", 1), ("b", 2), ("b", 3)]
    assert sums == [1.0, 1.0, 1.0, 1.0]
    assert [n for n, i, _ in log if i == -1] == ["off", "b", "a"]
