"""Mechanisms that change a UNet for one call and undo it exactly: processor swaps, hooks, and the guard that
checks nothing was left behind."""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch

from ..base.errors import IncompatibleModelError, SdxlControlError
from ..weights.patches import WeightDelta, WeightPatch
from .attention import attention_layers
from .conditions import Attachment, Condition, Prepared, Stage, StepInfo

__all__ = ["ProcessorPatch", "PatchedBranches", "WindowedDeltas", "ModelSnapshot", "attached", "fitted_patch"]


class ProcessorPatch:
    """Swap some attention processors of a UNet; ``restore`` puts back the very objects that were there.

    Example:
        >>> patch = ProcessorPatch(unet, {name: MyProcessor() for name in unet.attn_processors})  # doctest: +SKIP
        >>> patch.restore()                                                                      # doctest: +SKIP
    """

    def __init__(self, unet: Any, replacements: Mapping[str, Any]) -> None:
        layers = attention_layers(unet)
        unknown = sorted(set(replacements) - set(layers))
        if unknown:
            raise KeyError(f"no attention layer named {unknown[0]!r} in this UNet")
        self._saved = {name: (layers[name], layers[name].processor) for name in replacements}
        for name, processor in replacements.items():
            layers[name].set_processor(processor)

    def restore(self) -> None:
        for layer, processor in self._saved.values():
            layer.set_processor(processor)


class PatchedBranches(Attachment):
    """Attention branches installed by a processor patch: switched on and off with the condition (its step window),
    the patch restored on detach (IP-Adapter's image tokens, attention couple's regions).

    Example:
        >>> PatchedBranches(ProcessorPatch(unet, replacements), branches)  # doctest: +SKIP
    """

    def __init__(self, patch: ProcessorPatch, branches: Sequence[Any]) -> None:
        self.patch, self.branches = patch, list(branches)

    def contribute(self, step: StepInfo, active: bool) -> None:
        for branch in self.branches:
            branch.active = active

    def detach(self) -> None:
        self.patch.restore()


def fitted_patch(model: torch.nn.Module, deltas: Mapping[str, WeightDelta], owner: str) -> WeightPatch:
    """``deltas`` added to ``model``'s weights (see :class:`WeightPatch`); deltas named or shaped for another model
    are that model's misfit, said naming ``owner`` (the condition's class), whether applied per call or kept.

    Example:
        >>> fitted_patch(unet, {"mid_block.attentions.0.proj_in.weight": delta}, "LoRA").restore()  # doctest: +SKIP
    """
    try:
        return WeightPatch(model, deltas)
    except (ValueError, AttributeError) as exc:
        raise IncompatibleModelError(f"{owner}'s weight deltas do not fit this model: {exc}") from None


class WindowedDeltas(Attachment):
    """The weight channel on one model: ``deltas`` added while the condition acts and removed when it stops (so at most
    twice a call for a window), and always on ``detach``; the weights are bit-identical afterwards.

    Example:
        >>> part = WindowedDeltas(unet, {"mid_block.attentions.0.proj_in.weight": delta}, "LoRA")  # doctest: +SKIP
    """

    def __init__(self, model: torch.nn.Module, deltas: Mapping[str, WeightDelta], owner: str) -> None:
        self.model, self.deltas, self.owner = model, deltas, owner
        self.patch: WeightPatch | None = None

    def contribute(self, step: StepInfo, active: bool) -> None:
        if active and self.patch is None:
            self.patch = fitted_patch(self.model, self.deltas, self.owner)
        elif not active and self.patch is not None:
            self.detach()

    def detach(self) -> None:
        if self.patch is not None:
            self.patch.restore()
            self.patch = None


_HOOK_DICTS = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks", "_state_dict_hooks")


@dataclass(frozen=True)
class ModelSnapshot:
    """Cheap identity snapshot of a model: attention processor objects, hooks, and parameter objects.

    Weight *values* are not hashed here (that would cost a pass over billions of numbers per call); attachments
    that change weights restore them themselves and tests prove it bit for bit. One walk over the modules, reading
    their ``__dict__`` directly (``nn.Module.__getattr__`` would cost more than the walk).

    Example:
        >>> before = ModelSnapshot.take(unet); ...; before.differences(ModelSnapshot.take(unet))  # doctest: +SKIP
        []
    """

    processors: tuple[tuple[str, int], ...]
    hooks: tuple[tuple[str, str, tuple[int, ...]], ...]
    parameters: tuple[tuple[str, str, int], ...]

    @classmethod
    def take(cls, model: torch.nn.Module) -> ModelSnapshot:
        processors: list[tuple[str, int]] = []
        hooks: list[tuple[str, str, tuple[int, ...]]] = []
        parameters: list[tuple[str, str, int]] = []
        for name, module in model.named_modules():
            state = module.__dict__
            # Processors are plain objects, or modules (diffusers' IP-Adapter ones) kept in ``_modules``.
            processor = state.get("processor", state["_modules"].get("processor"))
            if processor is not None:
                processors.append((name, id(processor)))
            for kind in _HOOK_DICTS:
                if state.get(kind):
                    hooks.append((name, kind, tuple(state[kind])))
            parameters.extend((name, key, id(p)) for key, p in state["_parameters"].items())
        return cls(tuple(processors), tuple(hooks), tuple(parameters))

    def differences(self, other: ModelSnapshot) -> list[str]:
        out = []
        for label, a, b in (
            ("attention processors", self.processors, other.processors),
            ("hooks", self.hooks, other.hooks),
            ("parameters", self.parameters, other.parameters),
        ):
            if a != b:
                out.append(label)
        return out


@contextmanager
def attached(
    prepared: Sequence[tuple[Condition, Prepared]], unet: torch.nn.Module, stage: Stage
) -> Iterator[list[tuple[Condition, Attachment]]]:
    """Attach conditions to ``unet`` for the duration of the block; always detach, in reverse order.

    A condition's UNet weight deltas (the weight channel) come as a second attachment after its own, switched by the
    same rule. If an attach fails part way, the ones already attached are detached before the error propagates. After
    detaching, the UNet's processors, hooks and parameter objects must equal what they were; a condition that
    leaves anything behind is a bug: it is reported as an error (processors it left are put back first).
    """
    if not prepared:
        # Nothing attaches, so nothing can be left behind: skip the snapshot walks (milliseconds on a full UNet).
        yield []
        return
    before = ModelSnapshot.take(unet)
    processors = {name: (layer, layer.processor) for name, layer in attention_layers(unet).items()}
    live: list[tuple[Condition, Attachment]] = []
    try:
        for condition, ready in prepared:
            live.append((condition, ready.attach(unet, stage)))
            deltas = ready.weight_deltas(stage).get("unet")
            if deltas:
                live.append((condition, WindowedDeltas(unet, deltas, type(condition).__name__)))
        yield live
    finally:
        errors: list[BaseException] = []
        for _, attachment in reversed(live):
            try:
                attachment.detach()
            except BaseException as exc:  # keep detaching the others; report after
                errors.append(exc)
        changed = before.differences(ModelSnapshot.take(unet))
        if errors:
            raise errors[0]
        if changed:
            if "attention processors" in changed:
                for layer, processor in processors.values():
                    layer.set_processor(processor)
            names = ", ".join(dict.fromkeys(type(c).__name__ for c, _ in live))
            raise SdxlControlError(f"detaching [{names}] did not restore the UNet's {' and '.join(changed)}")
