"""Regional prompts and the guidance conditions (PAG, APG, FreeU, CFG rescale) read back from A1111/Forge texts and
ComfyUI graphs: what maps exactly is read, every approximation is stated in the import's notes, nothing is dropped
silently.

Keys and nodes (research notes with sources: issue 38, guidance §5 and regions §3):

- PAG: Forge's builtin ``pagi_*`` (what we write), the incantations extension's ``PAG Active``/``PAG Scale``/
  ``PAG Start Step``/``PAG End Step``, pamparamm's ``pag_*``; ComfyUI's ``PerturbedAttentionGuidance``.
- FreeU: Forge's builtin ``freeu_*`` (what we write), ljleb's ``FreeU Stages``/``FreeU Schedule``/``FreeU Version``;
  ComfyUI's ``FreeU`` and ``FreeU_V2``.
- CFG rescale: ``CFG Rescale`` (Seshelle/CFG_Rescale_webui, what we write), ``CFG Rescale φ``, ``CFG Rescale phi``;
  ComfyUI's ``RescaleCFG``.
- APG: ours, ``APG: eta E, threshold T, momentum M``; ComfyUI's ``APG``.
- Regions: Forge Couple's ``forge_couple_*`` (Basic and Advanced modes: boxes; Mask mode's masks are not in the text).

Example:
    >>> from sdxl_control.jobs.png_import import read_a1111
    >>> imported = read_a1111("a fox\\nSteps: 20, pagi_enabled: True, pagi_scale: 2.5, CFG Rescale: 0.7")
    >>> imported.conditions[0].kind, imported.conditions[0].scale, imported.settings["guidance_rescale"]
    ('pag', 2.5, 0.7)
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable, Mapping
from typing import Any

from ..base.errors import ConditionError
from ..base.stages import Stage, Window
from ..protocol.conditions import Condition

__all__ = ["read_a1111_guidance", "read_forge_couple", "read_comfyui_patch", "COMFYUI_GUIDANCE_NODES"]

# The keys each A1111 extension writes, taken here whether or not they map (so none is also listed as "no equivalent").
_RESCALE_KEYS = ("CFG Rescale", "CFG Rescale φ", "CFG Rescale phi")
_FORGE_PAG = ("pagi_enabled", "pagi_scale", "pagi_attenuation", "pagi_start_step", "pagi_end_step")
_INCANTATIONS_PAG = ("PAG Active", "PAG SANF", "PAG Scale", "PAG Start Step", "PAG End Step")
_PAMPARAMM_PAG = (
    "pag_enabled", "pag_scale", "pag_rescale", "pag_rescale_mode", "pag_adaptive_scale", "pag_block", "pag_block_id",
    "pag_block_list", "pag_sigma_start", "pag_sigma_end",
)  # fmt: skip
_FORGE_FREEU = ("freeu_enabled", "freeu_b1", "freeu_b2", "freeu_s1", "freeu_s2", "freeu_start", "freeu_end")
_LJLEB_FREEU = ("FreeU Stages", "FreeU Schedule", "FreeU Version")
# ljleb's per-stage defaults (lib_free_u/global_state.py): a stage field left out of the JSON has its default.
_LJLEB_STAGE = {"backbone_factor": 1.0, "skip_factor": 1.0, "backbone_offset": 0.0, "backbone_width": 0.5,
                "skip_cutoff": 0.0, "skip_high_end_factor": 1.0}  # fmt: skip

Skip = Callable[[str, str], None]


def _true(value: str | None) -> bool:
    return value is not None and value.strip().casefold() in ("true", "1", "yes")


def _float(items: Mapping[str, str], key: str, default: float, skip: Skip) -> float:
    value = items.get(key)
    if value is None:
        return default
    try:
        number = float(value)
    except ValueError:
        skip(f"{key}: {value}", f"not a number; {default:g} is used")
        return default
    if not math.isfinite(number):
        skip(f"{key}: {value}", f"not a finite number; {default:g} is used")
        return default
    return number


def forge_window(start: float, end: float, steps: int | None) -> Window:
    """Forge's step window (its builtin PAG and FreeU act at step ``i`` of ``n`` where ``start <= i/(n-1) <= end``)
    as ours (``i/n >= start`` and ``(i+1)/n <= end``): exact for ``steps`` steps; the whole schedule when it covers
    every step or the steps are unknown.

    Example:
        >>> forge_window(0.0, 0.5, 11)   # Forge's steps 0..5 of 11
        Window(start=0.0, end=0.5454545454545454)
    """
    if start <= 0 and end >= 1 or not steps or steps < 2:
        return Window()
    first = max(0, math.ceil(start * (steps - 1) - 1e-9))
    last = min(steps - 1, math.floor(end * (steps - 1) + 1e-9))
    if last < first:
        raise ConditionError(f"the window {start:g}..{end:g} covers none of {steps} steps")
    return Window(first / steps, (last + 1) / steps)


def _step_window(first: int, last: int, steps: int | None) -> Window:
    """A window in step numbers ``first..last`` (both acting, as incantations counts them) as ours."""
    if not steps or (first <= 0 and last >= steps - 1):
        return Window()
    first, last = max(0, first), min(steps - 1, last)
    if last < first:
        raise ConditionError(f"the steps {first}..{last} cover none of {steps} steps")
    return Window(first / steps, (last + 1) / steps)


def read_a1111_guidance(
    items: Mapping[str, str], settings: dict[str, Any], skip: Skip
) -> tuple[set[str], list[Condition]]:
    """The guidance conditions an A1111/Forge settings line records: (the keys taken, the conditions); settings
    (``guidance_rescale``) go into ``settings``; every approximation and every part not read is said by ``skip``."""
    from ..adapters.apg import APG
    from ..adapters.freeu import FreeU
    from ..adapters.pag import PAG

    taken: set[str] = set()
    conditions: list[Condition] = []
    steps = settings.get("steps")

    def build(what: str, make: Callable[[], Condition]) -> None:
        try:
            conditions.append(make())
        except ConditionError as exc:
            skip(what, f"{exc}; not read")

    # CFG rescale: Seshelle's extension (and ljleb's neutral prompt, "CFG Rescale phi") rescales A1111's denoised
    # (x0) predictions over the whole tensor; ours is diffusers' guidance_rescale on the model's output, per image.
    for key in _RESCALE_KEYS:
        if key in items:
            taken.add(key)
            value = _float(items, key, 0.0, skip)
            if 0.0 < value <= 1.0 and "guidance_rescale" not in settings:
                settings["guidance_rescale"] = value
                skip(f"{key}: {items[key]}", "read as guidance_rescale (the same formula on the model's output "
                     "per image; the extension rescales A1111's denoised image over the batch): close, not equal")  # fmt: skip
            elif value:
                skip(f"{key}: {items[key]}", "beyond guidance_rescale's 0..1, or given twice; not read")

    if any(k in items for k in _FORGE_PAG):
        taken.update(k for k in _FORGE_PAG if k in items)
        if items.get("pagi_enabled") is None or _true(items.get("pagi_enabled")):
            scale = _float(items, "pagi_scale", 3.0, skip)
            start, end = _float(items, "pagi_start_step", 0.0, skip), _float(items, "pagi_end_step", 1.0, skip)
            attenuation = _float(items, "pagi_attenuation", 0.0, skip)
            if attenuation:
                skip(f"pagi_attenuation: {items['pagi_attenuation']}", "Forge lowers the PAG scale by this % after "
                     "each step; the scale stays constant here")  # fmt: skip
            # Forge perturbs ("middle", 0): every transformer block of the mid block, diffusers' "mid".
            build("pagi_scale", lambda: PAG(scale=scale, layers=("mid",), window=forge_window(start, end, steps)))

    if any(k in items for k in _INCANTATIONS_PAG):
        taken.update(k for k in _INCANTATIONS_PAG if k in items)
        scale = _float(items, "PAG Scale", 0.0, skip)
        if _true(items.get("PAG Active")) and scale:
            first = int(_float(items, "PAG Start Step", 0, skip))
            last = int(_float(items, "PAG End Step", 150, skip))
            skip(f"PAG Scale: {items['PAG Scale']}", "incantations perturbs only the mid block's first transformer "
                 "block; read as PAG on the whole mid block (diffusers' 'mid'): close, not equal")  # fmt: skip
            if _true(items.get("PAG SANF")):
                skip("PAG SANF: True", "saliency-adaptive noise fusion has no equivalent here; not read")
            build("PAG Scale", lambda: PAG(scale=scale, layers=("mid",), window=_step_window(first, last, steps)))
    for key in ("CFG Interval Enable", "CFG Interval Schedule", "CFG Interval Low", "CFG Interval High"):
        if key in items:
            taken.add(key)
            skip(f"{key}: {items[key]}", "incantations' CFG interval has no equivalent here; not read")

    if any(k in items for k in _PAMPARAMM_PAG):
        taken.update(k for k in _PAMPARAMM_PAG if k in items)
        if items.get("pag_enabled") is None or _true(items.get("pag_enabled")):
            scale = _float(items, "pag_scale", 3.0, skip)
            adaptive = _float(items, "pag_adaptive_scale", 0.0, skip)
            # pamparamm: s - scale * adaptive**4 * (1000 - t); diffusers: s - adaptive * (1000 - t): the same rule
            # with diffusers' adaptive = scale * adaptive**4.
            block = (items.get("pag_block") or "middle").strip()
            if block != "middle" or (items.get("pag_block_list") or "").strip():
                skip(f"pag_block: {block}", "read as the mid block (diffusers' 'mid'); other blocks are not read")
            for key, default in (("pag_rescale", 0.0), ("pag_sigma_start", -1.0), ("pag_sigma_end", -1.0)):
                if _float(items, key, default, skip) != default:
                    skip(f"{key}: {items[key]}", "no equivalent here (a window in sigmas, a rescale of PAG); not read")
            build("pag_scale", lambda: PAG(scale=scale, adaptive_scale=scale * adaptive**4, layers=("mid",)))

    if any(k in items for k in _FORGE_FREEU):
        taken.update(k for k in _FORGE_FREEU if k in items)
        if items.get("freeu_enabled") is None or _true(items.get("freeu_enabled")):
            factors = {name: _float(items, f"freeu_{name}", default, skip)
                       for name, default in (("b1", 1.01), ("b2", 1.02), ("s1", 0.99), ("s2", 0.95))}  # fmt: skip
            start, end = _float(items, "freeu_start", 0.0, skip), _float(items, "freeu_end", 1.0, skip)
            skip("freeu_b1", "Forge's FreeU is ComfyUI's FreeU_V2 (structure-aware backbone factor, blocks keyed by "
                 "channels); read as diffusers' FreeU with the same factors: close, not equal")  # fmt: skip
            build("freeu_b1", lambda: FreeU(**factors, window=forge_window(start, end, steps)))

    if any(k in items for k in _LJLEB_FREEU):
        taken.update(k for k in _LJLEB_FREEU if k in items)
        _ljleb_freeu(items, steps, skip, build)

    if "APG" in items:  # ours (tentative form): "eta E, threshold T, momentum M"
        taken.add("APG")
        number = r"([-+\d.eE]+)"
        match = re.fullmatch(
            rf"\s*eta\s+{number}\s*,\s*threshold\s+{number}\s*,\s*momentum\s+{number}"
            rf"(?:\s*,\s*scale\s+{number})?(?:\s*,\s*window\s+{number}\s*-\s*{number})?\s*",
            items["APG"],
        )
        if match is None:
            skip(f"APG: {items['APG']}", "not 'eta E, threshold T, momentum M[, scale S][, window A-B]'; not read")
        else:
            eta, threshold, momentum = (float(g) for g in match.groups()[:3])
            extra: dict[str, Any] = {}
            if match.group(4) is not None:
                extra["scale"] = float(match.group(4))
            if match.group(5) is not None:
                extra["window"] = (float(match.group(5)), float(match.group(6)))
            build("APG", lambda: APG(eta=eta, norm_threshold=threshold, momentum=momentum, **extra))
    return taken, conditions


def _ljleb_freeu(items: Mapping[str, str], steps: int | None, skip: Skip, build: Callable[..., None]) -> None:
    from ..adapters.freeu import FreeU

    text = items.get("FreeU Stages")
    try:
        stages = json.loads(text) if text else []
        stages = [{**_LJLEB_STAGE, **dict(stage)} for stage in stages]
    except (ValueError, TypeError):
        skip(f"FreeU Stages: {text}", "not ljleb's JSON list of stages; not read")
        return
    if len(stages) < 2:
        skip(f"FreeU Stages: {text}", "fewer than two stages; not read")
        return
    own = [f"stage {i + 1} {k}" for i, stage in enumerate(stages[:2]) for k in _LJLEB_STAGE
           if k not in ("backbone_factor", "skip_factor") and stage[k] != _LJLEB_STAGE[k]]  # fmt: skip
    own += [f"stage {i + 1}" for i, stage in enumerate(stages[2:], 2) if stage != _LJLEB_STAGE]
    if own:
        skip("FreeU Stages", f"{', '.join(own)} have no equivalent here; not read")
    window = Window()
    if schedule := items.get("FreeU Schedule"):
        try:
            start, stop, *_ = (float(part) for part in schedule.split(","))
            window = forge_window(start, stop, steps) if (start, stop) != (0.0, 1.0) else Window()
        except (ValueError, ConditionError):
            skip(f"FreeU Schedule: {schedule}", "not read; FreeU acts at every step")
    skip("FreeU Stages", f"ljleb's FreeU (version {items.get('FreeU Version', '?')}) keys stages by channels; read as "
         "diffusers' FreeU with stage 1 and 2's factors (b1, s1, b2, s2): close, not equal")  # fmt: skip
    one, two = stages[0], stages[1]
    build("FreeU Stages", lambda: FreeU(b1=float(one["backbone_factor"]), s1=float(one["skip_factor"]),
                                        b2=float(two["backbone_factor"]), s2=float(two["skip_factor"]), window=window))  # fmt: skip


def read_forge_couple(prompt: str, items: Mapping[str, str], size: tuple[int, int] | None,
                      skip: Skip) -> tuple[set[str], str, list[Condition]]:  # fmt: skip
    """Forge Couple's regions (its ``forge_couple_*`` keys): (the keys taken, the base prompt, the regions as
    ``Region(mode="attention")`` with boxes by its tiling (Basic) or mapping (Advanced) rules)."""
    from ..adapters.regions import Region

    taken = {k for k in items if k.startswith("forge_couple")}
    if not taken or not _true(items.get("forge_couple")):
        if items.get("forge_couple", "").strip() == "ERROR":
            skip("forge_couple: ERROR", "Forge Couple refused its input; no regions read")
        return taken, prompt, []
    width, height = size or (1024, 1024)
    mode = (items.get("forge_couple_mode") or "Basic").strip()
    separator = (items.get("forge_couple_separator") or "").encode().decode("unicode_escape") or "\n"
    lines = [line.strip() for line in prompt.split(separator)]
    parser = (items.get("forge_couple_common_parser") or "{ }").strip()
    if parser != "off" and any(ch in prompt for ch in "{<"):
        skip(f"forge_couple_common_parser: {parser}", "its common prompts ({key:value}) are not expanded here")
    if mode == "Mask":
        skip("forge_couple_mode: Mask", "its painted masks are not in the PNG: no regions read; paint them with "
             "--region MASK:PROMPT")  # fmt: skip
        return taken, prompt, []
    regions: list[Condition] = []
    if mode == "Advanced":
        try:
            mapping = json.loads(items.get("forge_couple_mapping") or "[]")
        except ValueError:
            skip("forge_couple_mapping", "not a JSON list of [x1, x2, y1, y2, weight]; no regions read")
            return taken, prompt, []
        if len(mapping) != len(lines):
            skip("forge_couple_mapping", f"{len(mapping)} rows for {len(lines)} lines; no regions read")
            return taken, prompt, []
        for line, (x1, x2, y1, y2, weight) in zip(lines, mapping, strict=True):
            # Forge Couple's mask: [int(H*y1):int(H*y2), int(W*x1):int(W*x2)].
            box = (
                int(width * x1) / width,
                int(height * y1) / height,
                int(width * x2) / width,
                int(height * y2) / height,
            )
            regions.append(Region(prompt=line, box=box, mode="attention", scale=float(weight)))
        return taken, " ".join(lines), regions
    if mode != "Basic":
        skip(f"forge_couple_mode: {mode}", "not a mode read here (Basic, Advanced); no regions read")
        return taken, prompt, []
    background = (items.get("forge_couple_background") or "None").strip()
    tiles = lines[1:] if background == "First Line" else lines[:-1] if background == "Last Line" else lines
    weight = 1.25 if background == "None" else 1.0
    horizontal = (items.get("forge_couple_direction") or "Horizontal").strip() != "Vertical"
    length = width if horizontal else height
    size_px = (length - 1) // len(tiles) + 1
    for i, line in enumerate(tiles):
        lo, hi = i * size_px / length, min((i + 1) * size_px, length) / length
        box = (lo, 0.0, hi, 1.0) if horizontal else (0.0, lo, 1.0, hi)
        regions.append(Region(prompt=line, box=box, mode="attention", scale=weight))
    if background != "None":
        base = lines[0] if background == "First Line" else lines[-1]
        bg_weight = max(0.1, _float(items, "forge_couple_background_weight", 0.5, skip))
        regions.append(Region(prompt=base, box=(0.0, 0.0, 1.0, 1.0), mode="attention", scale=bg_weight))
    skip("forge_couple", "Forge Couple's attention couple read as regions in attention mode (its boxes and weights); "
         "the base prompt is its lines joined")  # fmt: skip
    return taken, " ".join(lines), regions


# ComfyUI's model-chain nodes read as guidance (their inputs, ComfyUI's defaults).
COMFYUI_GUIDANCE_NODES = ("PerturbedAttentionGuidance", "FreeU", "FreeU_V2", "RescaleCFG", "APG")


def read_comfyui_patch(kind: str, values: Mapping[str, Any], role: str, settings: dict[str, Any],
                       skip: Callable[[str], None]) -> Condition | None:  # fmt: skip
    """A ComfyUI guidance node on the model chain of ``role`` ("base" or "refiner") as a condition (or, RescaleCFG,
    ``settings["guidance_rescale"]``); the approximation said by ``skip``."""
    from ..adapters.apg import APG
    from ..adapters.freeu import FreeU
    from ..adapters.pag import PAG

    stage = Stage.REFINER if role == "refiner" else Stage.BASE
    try:
        if kind == "PerturbedAttentionGuidance":
            # ComfyUI's ("middle", 0) with no transformer index: every mid transformer block, diffusers' "mid".
            return PAG(scale=float(values.get("scale", 3.0)), layers=("mid",), stage=stage)
        if kind in ("FreeU", "FreeU_V2"):
            defaults = (1.1, 1.2, 0.9, 0.2) if kind == "FreeU" else (1.3, 1.4, 0.9, 0.2)
            factors = {k: float(values.get(k, d)) for k, d in zip(("b1", "b2", "s1", "s2"), defaults, strict=True)}
            skip(f"ComfyUI's {kind} picks blocks by their channels (SDXL's output blocks 0-3 get b1, 4-6 b2)"
                 + (" with a structure-aware backbone factor" if kind == "FreeU_V2" else "")
                 + "; read as diffusers' FreeU with the same factors: close, not equal")  # fmt: skip
            return FreeU(**factors, stage=stage)
        if kind == "APG":
            skip(
                "ComfyUI's APG works on denoised (x0) predictions and gives cond + cfg * update; read as diffusers' "
                "AdaptiveProjectedGuidance (noise predictions, uncond + cfg * update): close, not equal"
            )
            return APG(eta=float(values.get("eta", 1.0)), norm_threshold=float(values.get("norm_threshold", 5.0)),
                       momentum=float(values.get("momentum", 0.0)), stage=stage)  # fmt: skip
        if kind == "RescaleCFG":
            multiplier = float(values.get("multiplier", 0.7))
            if role != "base":
                skip("read on the base's chain only (guidance_rescale is one for both stages); not read")
                return None
            settings["guidance_rescale"] = multiplier
            skip(
                f"multiplier {multiplier:g} read as guidance_rescale: ComfyUI rescales in v-prediction space "
                "whatever the model; equal for v-prediction models, close for epsilon ones"
            )
            return None
    except ConditionError as exc:
        skip(f"{exc}; not read")
    return None


# ComfyUI's conditioning nodes that make a region of a prompt (nodes.py), read by :func:`comfyui_regions`.
COMFYUI_REGION_NODES = (
    "ConditioningSetMask", "ConditioningSetArea", "ConditioningSetAreaPercentage", "ConditioningSetAreaStrength",
    "ConditioningSetTimestepRange",
)  # fmt: skip
_TEXT_NODES = ("CLIPTextEncode", "CLIPTextEncodeSDXL", "CLIPTextEncodeSDXLRefiner")


def comfyui_regions(
    walk: Callable[[Any], Any], node: Callable[[Any], Any], link: Any, size: tuple[int, int],
    skip: Callable[[str, str], None], seen: Callable[[str], None],
) -> tuple[str | None, list[Condition]] | None:  # fmt: skip
    """A ComfyUI prompt's conditioning tree (``ConditioningCombine`` of chains of ``ConditioningSetMask`` /
    ``SetArea`` / ``SetAreaPercentage`` / ``SetAreaStrength`` / ``SetTimestepRange`` over a text node) as (the base
    prompt: the first chain without an area or mask, the regions as ``Region(mode="masked")``); ``None`` where the
    tree has no region. ``walk(link)`` gives one chain's nodes as ``(node_id, class_type, inputs)``, ``node(link)``
    a linked node, ``skip(node_id, why)`` notes, ``seen(node_id)`` marks a node read. ``size``: the image's (width,
    height) in pixels, whose latent (/8) ComfyUI's areas are cut from."""
    from ..adapters.regions import Region

    chains: list[list[tuple[str, str, Mapping[str, Any]]]] = []

    def collect(start: Any, depth: int = 0) -> None:
        found = node(start)
        if found is None or depth > 64:
            return
        node_id, spec = found
        if spec["class_type"] == "ConditioningCombine":
            seen(node_id)
            inputs = spec.get("inputs", {})
            collect(inputs.get("conditioning_1"), depth + 1)
            collect(inputs.get("conditioning_2"), depth + 1)
            return
        chain = []
        for step in walk(start):
            if step[1] == "ConditioningCombine":  # a combine lower down: its own branches
                collect([step[0], 0], depth + 1)
                break
            chain.append(step)
        chains.append(chain)

    collect(link)
    if not any(kind in COMFYUI_REGION_NODES for chain in chains for _, kind, _ in chain):
        return None
    width, height = size
    lw, lh = width // 8, height // 8
    base: str | None = None
    regions: list[Condition] = []
    for chain in chains:
        text = next((_text(values) for _, kind, values in chain if kind in _TEXT_NODES), None)
        modifiers = [(node_id, kind, values) for node_id, kind, values in chain if kind in COMFYUI_REGION_NODES]
        others = [(node_id, kind) for node_id, kind, _ in chain if kind not in (*COMFYUI_REGION_NODES, *_TEXT_NODES)]
        for node_id, kind in others:
            skip(node_id, f"{kind} on a regional prompt's chain is not read")
        if text is None:
            continue
        if not modifiers:
            if base is None:
                base = text
            else:
                skip(chain[0][0], f"a second prompt without an area or mask ({text[:40]!r}) combined with the first; "
                     "only the first is the base prompt")  # fmt: skip
            continue
        strength, window, box, mask, mask_strength = 1.0, Window(), None, None, 1.0
        ok = True
        # The chain goes from the sampler up: the node nearest the text set its keys first, a later one overrides.
        for node_id, kind, values in reversed(modifiers):
            if kind == "ConditioningSetTimestepRange":
                start, end = float(values.get("start", 0.0)), float(values.get("end", 1.0))
                if (start, end) != (0.0, 1.0):
                    window = Window(start, end)
                    skip(node_id, f"its range {start:g}..{end:g} is in percent of the model's timesteps (sigmas); read "
                         "as a window in fractions of the steps: close, not equal")  # fmt: skip
            elif kind == "ConditioningSetAreaStrength":
                strength = float(values.get("strength", 1.0))
            elif kind == "ConditioningSetArea":
                # ComfyUI: area (h//8, w//8, y//8, x//8) in latent units, clamped to the latent.
                x, y = int(values.get("x", 0)) // 8, int(values.get("y", 0)) // 8
                w, h = int(values.get("width", 64)) // 8, int(values.get("height", 64)) // 8
                box = (min(x, lw) / lw, min(y, lh) / lh, min(x + w, lw) / lw, min(y + h, lh) / lh)
                strength = float(values.get("strength", 1.0))
            elif kind == "ConditioningSetAreaPercentage":
                x, y = round(float(values.get("x", 0.0)) * lw), round(float(values.get("y", 0.0)) * lh)
                w, h = (
                    max(1, round(float(values.get("width", 1.0)) * lw)),
                    max(1, round(float(values.get("height", 1.0)) * lh)),
                )
                box = (min(x, lw) / lw, min(y, lh) / lh, min(x + w, lw) / lw, min(y + h, lh) / lh)
                strength = float(values.get("strength", 1.0))
            elif kind == "ConditioningSetMask":
                mask_strength = float(values.get("strength", 1.0))
                if str(values.get("set_cond_area", "default")) != "default":
                    skip(node_id, "set_cond_area 'mask bounds' (the UNet run on the mask's bounding box) is read as "
                         "the mask over the whole image: close, not equal")  # fmt: skip
                mask = _comfyui_mask(node, values.get("mask"), node_id, skip, seen)
                ok = mask is not None
        if not ok:
            continue
        scale = strength
        if mask is not None:
            value = float(
                mask
            )  # a solid mask: its value is a factor of ComfyUI's mult = mask * mask_strength * strength
            scale = strength * mask_strength * value
            box = box or (0.0, 0.0, 1.0, 1.0)
        if box is not None and box[0] < box[2] and box[1] < box[3]:
            try:
                regions.append(Region(prompt=text, box=box, mode="masked", scale=scale, window=window))
            except ConditionError as exc:
                skip(modifiers[0][0], f"{exc}; not read")
        else:
            skip(modifiers[0][0], "an empty area; not read")
    if base is None:
        base = ""
        skip(
            chains[0][0][0] if chains and chains[0] else "?",
            "no prompt without an area or mask: the base prompt is empty",
        )
    return base, regions


def _text(values: Mapping[str, Any]) -> str:
    return str(values.get("text", values.get("text_g", "")))


def _comfyui_mask(node: Callable[[Any], Any], link: Any, region: str, skip: Callable[[str, str], None],
                  seen: Callable[[str], None]) -> float | None:  # fmt: skip
    """A region's mask: a ``SolidMask``'s value (exact: a solid mask is a factor of the region's weight); any other
    source (``LoadImageMask``: only its file name is in the PNG) is said, and ``None``."""
    found = node(link)
    if found is None:
        skip(region, "no mask reaches it; not read")
        return None
    mask_id, spec = found
    seen(mask_id)
    values = spec.get("inputs", {})
    if spec["class_type"] == "SolidMask":
        return float(values.get("value", 1.0))
    if spec["class_type"] == "LoadImageMask":
        skip(region, f"its mask is the file {values.get('image')!r} (channel {values.get('channel', 'alpha')}) in "
             "ComfyUI's input folder, not in the PNG; give it with --region MASK:PROMPT")  # fmt: skip
        return None
    skip(region, f"its mask comes from {spec['class_type']}, not read here; give it with --region MASK:PROMPT")
    return None
