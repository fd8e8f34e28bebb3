"""A test condition that uses both composition channels: it wraps cross-attention processors and registers a
hook (attention channel), and adds residuals (residual channel). It can raise mid-loop or leak on purpose."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from sdxl_control import Attachment, Condition, Prepared, Residuals, Stage
from sdxl_control.protocol.attach import ProcessorPatch


class ScaledProcessor:
    """Scales the wrapped processor's output while the condition is active."""

    def __init__(self, inner: Any, state: dict[str, Any], scale: float) -> None:
        self.inner, self.state, self.scale = inner, state, scale

    def __call__(self, attn: Any, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        out = self.inner(attn, hidden_states, *args, **kwargs)
        return out * (1.0 + self.scale) if self.state["active"] else out


@dataclass(frozen=True)
class Probe(Condition):
    raise_at: int | None = None
    fail_attach: bool = False
    leak_hook: bool = False
    residual: float = 0.0

    kind = "probe"
    supported_stages = Stage.BOTH

    def prepare(self, ctx):
        return ProbePrepared(self)


@dataclass(frozen=True)
class BaseOnlyProbe(Probe):
    kind = "base-only-probe"
    supported_stages = Stage.BASE
    unsupported_reason = "it is trained for the base UNet"


class ProbePrepared(Prepared):
    def __init__(self, condition: Probe) -> None:
        self.condition = condition
        self.attached_stages: list[Stage] = []

    def attach(self, unet, stage):
        if self.condition.fail_attach:
            raise RuntimeError("attach failed")
        self.attached_stages.append(stage)
        return ProbeAttachment(unet, self.condition)


class ProbeAttachment(Attachment):
    def __init__(self, unet, condition: Probe) -> None:
        self.condition = condition
        self.state = {"active": False}
        cross = {
            n: ScaledProcessor(p, self.state, condition.scale) for n, p in unet.attn_processors.items() if "attn2" in n
        }
        self.patch = ProcessorPatch(unet, cross)
        self.calls = 0
        self.hook = unet.conv_in.register_forward_hook(self._count)
        self.unet = unet

    def _count(self, *_: Any) -> None:
        self.calls += 1

    def contribute(self, step, active):
        if self.condition.raise_at is not None and step.index == self.condition.raise_at:
            raise RuntimeError("boom")
        self.state["active"] = active
        if not (active and self.condition.residual):
            return None
        batch = step.sample.shape[0]
        # Zero-filled residuals of the UNet's down/mid shapes, shifted by `residual`: enough to move the output.
        down = tuple(torch.full((batch, c, *s), self.condition.residual) for c, s in self._down_shapes(step.sample))
        mid_c, mid_s = self._down_shapes(step.sample)[-1]
        return Residuals(down, torch.full((batch, mid_c, *mid_s), self.condition.residual))

    def _down_shapes(self, sample):
        h, w = sample.shape[-2:]
        shapes = [(self.unet.config.block_out_channels[0], (h, w))]
        for i, block in enumerate(self.unet.down_blocks):
            c = self.unet.config.block_out_channels[i]
            shapes += [(c, (h, w))] * len(block.resnets)
            if block.downsamplers is not None:
                h, w = (h + 1) // 2, (w + 1) // 2
                shapes.append((c, (h, w)))
        return shapes

    def detach(self):
        self.patch.restore()
        if not self.condition.leak_hook:
            self.hook.remove()
