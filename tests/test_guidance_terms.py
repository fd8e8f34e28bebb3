"""The guidance channel (protocol.guidance's terms) and the rows every condition reads (protocol.rows).

A guidance condition acts on how a step's predictions combine; where it asks, the loop adds the prompt's rows again,
perturbed. These tests drive the channel with a probe condition written here, and with CFG rescale (the request's
``guidance_rescale``, now a term): one rule, scale 0 or a window that holds no step is absent, bit for bit.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import pytest
import torch

from sdxl_control.base.errors import ConditionError
from sdxl_control.protocol.conditions import Condition, PrepareContext, Prepared, Stage
from sdxl_control.protocol.guidance import (
    CFGRescale,
    ClassifierFreeGuidance,
    GuidanceStep,
    GuidanceTerm,
    NoGuidance,
    TermOrder,
    guided_step,
)
from sdxl_control.protocol.rows import Rows, call_rows

RUN = dict(steps=4, size=(64, 64), seed=11, progress_bar=False)

# What the probe's term saw at each step it acted: (index, perturbed rows in the call, the perturbed prediction).
SEEN: list[tuple[int, int, torch.Tensor | None, torch.Tensor]] = []


class _ProbeTerm(GuidanceTerm):
    order: ClassVar[TermOrder] = TermOrder.ADD
    perturbs: ClassVar[bool] = True

    def __init__(self, weight: float) -> None:
        self.weight = weight

    def combine(self, step: GuidanceStep) -> torch.Tensor:
        SEEN.append((step.index, 0, step.perturbed, step.cond))
        assert step.perturbed is not None
        return step.guided + self.weight * (step.cond - step.perturbed + 0.01)


@dataclass(frozen=True, eq=False)
class _ProbeReady(Prepared):
    weight: float

    def guidance_term(self, stage: Stage) -> GuidanceTerm | None:
        return _ProbeTerm(self.weight)


@dataclass(frozen=True, kw_only=True)
class Probe(Condition):
    """A guidance condition that asks for the perturbed rows (nothing perturbs them here) and adds a constant."""

    kind: ClassVar[str] = "probe"
    supported_stages: ClassVar[Stage] = Stage.BOTH

    def prepare(self, ctx: PrepareContext) -> Prepared:
        return _ProbeReady(self.scale)


def test_rows_lay_out_prepared_rows():
    rows = Rows.of_parts(batch=2, parts=3, guided=True)
    assert rows.source == (0, 1, 2, 3, 2, 3, 2, 3) and not rows.is_identity
    prepared = torch.arange(4)
    assert rows.gather(prepared).tolist() == [0, 1, 2, 3, 2, 3, 2, 3]
    plain = Rows.of_parts(batch=2, parts=1, guided=True)
    assert plain.is_identity and plain.gather(prepared) is prepared  # the plain batch: the tensor itself
    extra = Rows((0, 1, 2, 3, 2, 3), 4, (False,) * 4 + (True,) * 2)
    assert plain.then(extra).perturbed == extra.perturbed
    assert rows.then(Rows((0, 2, 4, 4), 8, (False, False, False, True))).source == (0, 2, 2, 2)
    with pytest.raises(ConditionError, match="read outside"):
        Rows((0, 4), 4)
    with pytest.raises(ConditionError, match="3 prepared rows given for a layout of 4"):
        plain.gather(torch.arange(3))
    with pytest.raises(ConditionError, match="needs classifier-free guidance"):
        Rows.of_parts(batch=1, parts=2, guided=False)
    assert call_rows() is None  # outside the loop's calls


def test_a_step_without_terms_is_the_guidance_itself():
    prediction = torch.randn(4, 4, 8, 8)
    for guidance in (ClassifierFreeGuidance(5.0), ClassifierFreeGuidance(3.0, weights=(0.7, 0.4)), NoGuidance()):
        head = prediction[: 2 if isinstance(guidance, ClassifierFreeGuidance) and guidance.copies == 2 else 3]
        if isinstance(guidance, NoGuidance):
            head = prediction[:1]
        assert torch.equal(guided_step(guidance, head, []), guidance.combine(head))


def test_cfg_rescale_as_a_term_is_diffusers_rescale_bit_for_bit():
    """diffusers' rescale_noise_cfg on the guided prediction, measured against the prompt's (with AND parts: the parts'
    prediction without the scale), bit for bit; tests/test_vpred.py runs it end to end."""
    from diffusers.pipelines.stable_diffusion_xl.pipeline_stable_diffusion_xl import rescale_noise_cfg

    prediction = torch.randn(6, 4, 8, 8)
    for weights in ((1.0,), (0.6, 0.8)):
        guidance = ClassifierFreeGuidance(4.0, weights=weights)
        rows = prediction[: guidance.copies]
        theirs = rescale_noise_cfg(guidance.combine(rows), guidance.split(rows)[1], guidance_rescale=0.7)
        assert torch.equal(guided_step(guidance, rows, [CFGRescale(0.7)], scale=4.0), theirs)
    # Without classifier-free guidance it changes nothing (diffusers rescales only with CFG).
    alone = prediction[:1]
    assert torch.equal(guided_step(NoGuidance(), alone, [CFGRescale(0.7)]), alone)


def test_two_terms_that_replace_the_guidance_are_refused():
    class Anew(GuidanceTerm):
        order = TermOrder.REPLACE

        def combine(self, step):
            return step.cond

    with pytest.raises(ConditionError, match="Anew and Anew each compute the guidance anew"):
        guided_step(ClassifierFreeGuidance(5.0), torch.randn(2, 4, 8, 8), [Anew(), Anew()])


def _unet_rows(generator):
    """Rows of every UNet call, and the perturbed flags stated for it, recorded by a pre-hook."""
    calls: list[tuple[int, tuple[bool, ...]]] = []

    def hook(module, args, kwargs):
        rows = call_rows()
        calls.append((args[0].shape[0], rows.perturbed if rows is not None else ()))

    return calls, generator.base.unet.register_forward_pre_hook(hook, with_kwargs=True)


def test_a_term_that_perturbs_adds_the_prompt_rows_only_where_it_acts(generator):
    plain = generator.generate("a lighthouse", num_images=2, **RUN)
    for absent in (Probe(scale=0.0), Probe(scale=2.0, window=(0.9, 1.0))):  # 4 steps: no step lies in 0.9-1.0
        SEEN.clear()
        same = generator.generate("a lighthouse", num_images=2, conditions=[absent], **RUN)
        assert torch.equal(same.latents, plain.latents) and not SEEN
    SEEN.clear()
    calls, handle = _unet_rows(generator)
    try:
        acted = generator.generate("a lighthouse", num_images=2, conditions=[Probe(scale=2.0, window=(0.5, 1.0))],
                                   **RUN)  # fmt: skip
    finally:
        handle.remove()
    # Steps 0-1: [uncond x2, cond x2]; steps 2-3: the prompt's two rows again, marked perturbed for the attention.
    assert [n for n, _ in calls] == [4, 4, 6, 6]
    assert calls[2][1] == (False,) * 4 + (True,) * 2
    assert [index for index, *_ in SEEN] == [2, 3]
    for _, _, perturbed, cond in SEEN:  # nothing perturbs the attention here: the copies predict the prompt's rows
        torch.testing.assert_close(perturbed, cond, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(acted.latents, plain.latents)


def test_terms_follow_their_order_and_the_conditions_order():
    order: list[str] = []

    class Named(GuidanceTerm):
        def __init__(self, name, at):
            self.name, self.order = name, at

        def combine(self, step):
            order.append(self.name)
            return step.guided

    terms = [Named("rescale", TermOrder.FINISH), Named("pag", TermOrder.ADD), Named("apg", TermOrder.REPLACE),
             Named("other", TermOrder.ADD)]  # fmt: skip
    guided_step(ClassifierFreeGuidance(5.0), torch.randn(2, 4, 8, 8), terms)
    assert order == ["apg", "pag", "other", "rescale"]
