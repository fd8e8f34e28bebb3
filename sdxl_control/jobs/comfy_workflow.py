"""A ComfyUI workflow as its editor saves it (the ``workflow`` PNG chunk, a shared ``.json``) turned into the graph
ComfyUI runs (its ``prompt``: node id -> class_type and inputs), so a PNG that kept only its workflow is read as one
that kept both.

In a workflow, each node lists its links (``inputs``: name and link id; ``links``: ``[id, from node, from slot, to
node, to slot, type]``) and its widgets' values in order (``widgets_values``), without their names: the names are
ComfyUI's (``INPUT_TYPES`` order, ``nodes.py`` and ``comfy_extras`` at Comfy-Org/ComfyUI a125cd84), or, for a node
not named here, those the workflow itself gives (newer editors list every widget among the inputs). A seed widget is
followed by its "control after generate" value (``fixed``, ``randomize``...), which is not an input. As ComfyUI runs
a workflow: ``Note`` nodes and muted nodes (mode 2) are not run, a bypassed node (mode 4) passes its input of the same
type on, ``Reroute`` passes its input on, and a primitive node gives its value to the widget it feeds.

Example:
    >>> workflow = {"nodes": [
    ...     {"id": 4, "type": "CheckpointLoaderSimple", "widgets_values": ["sd_xl_base_1.0.safetensors"]},
    ...     {"id": 3, "type": "KSampler", "inputs": [{"name": "model", "link": 1}],
    ...      "widgets_values": [42, "randomize", 20, 7, "euler", "normal", 1]}],
    ...     "links": [[1, 4, 0, 3, 0, "MODEL"]]}
    >>> workflow_graph(workflow)["3"]
    {'class_type': 'KSampler', 'inputs': {'seed': 42, 'steps': 20, 'cfg': 7, 'sampler_name': 'euler', 'scheduler': 'normal', 'denoise': 1, 'model': ['4', 0]}}
"""  # noqa: E501

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from ..base.errors import InputError

__all__ = ["workflow_graph", "WIDGETS"]

# Node type -> its widgets' names, in the order widgets_values holds them.
WIDGETS: dict[str, tuple[str, ...]] = {
    "CheckpointLoaderSimple": ("ckpt_name",),
    "CheckpointLoader": ("config_name", "ckpt_name"),
    "unCLIPCheckpointLoader": ("ckpt_name",),
    "CLIPTextEncode": ("text",),
    "CLIPTextEncodeSDXL": ("width", "height", "crop_w", "crop_h", "target_width", "target_height", "text_g", "text_l"),
    "CLIPTextEncodeSDXLRefiner": ("ascore", "width", "height", "text"),
    "CLIPSetLastLayer": ("stop_at_clip_layer",),
    "EmptyLatentImage": ("width", "height", "batch_size"),
    "LoraLoader": ("lora_name", "strength_model", "strength_clip"),
    "LoraLoaderModelOnly": ("lora_name", "strength_model"),
    "VAELoader": ("vae_name",),
    "KSampler": ("seed", "steps", "cfg", "sampler_name", "scheduler", "denoise"),
    "KSamplerAdvanced": ("add_noise", "noise_seed", "steps", "cfg", "sampler_name", "scheduler", "start_at_step",
                         "end_at_step", "return_with_leftover_noise"),
    "LatentUpscaleBy": ("upscale_method", "scale_by"),
    "LatentUpscale": ("upscale_method", "width", "height", "crop"),
    "ModelSamplingDiscrete": ("sampling", "zsnr"),
    "RescaleCFG": ("multiplier",),
    # The guidance nodes read back as conditions (comfy_extras/nodes_pag.py, nodes_freelunch.py, nodes_apg.py).
    "PerturbedAttentionGuidance": ("scale",),
    "FreeU": ("b1", "b2", "s1", "s2"),
    "FreeU_V2": ("b1", "b2", "s1", "s2"),
    "APG": ("eta", "norm_threshold", "momentum"),
    "ModelMergeSimple": ("ratio",),
    "SamplerCustom": ("add_noise", "noise_seed", "cfg"),
    "KSamplerSelect": ("sampler_name",),
    "BasicScheduler": ("scheduler", "steps", "denoise"),
    "KarrasScheduler": ("steps", "sigma_max", "sigma_min", "rho"),
    "ExponentialScheduler": ("steps", "sigma_max", "sigma_min"),
    "SDTurboScheduler": ("steps", "denoise"),
    "AlignYourStepsScheduler": ("model_type", "steps", "denoise"),
    "BetaSamplingScheduler": ("steps", "alpha", "beta"),
    "RandomNoise": ("noise_seed",),
    "CFGGuider": ("cfg",),
    "SamplerEulerAncestral": ("eta", "s_noise"),
    "SamplerDPMPP_2M_SDE": ("solver_type", "eta", "s_noise", "noise_device"),
    "SamplerDPMPP_3M_SDE": ("eta", "s_noise", "noise_device"),
    "SamplerDPMPP_SDE": ("eta", "s_noise", "r", "noise_device"),
    "SamplerDPMPP_2S_Ancestral": ("eta", "s_noise"),
    "SamplerLMS": ("order",),
    "ControlNetLoader": ("control_net_name",),
    "ControlNetApply": ("strength",),
    "ControlNetApplyAdvanced": ("strength", "start_percent", "end_percent"),
    "UpscaleModelLoader": ("model_name",),
    "ImageScale": ("upscale_method", "width", "height", "crop"),
    "SaveImage": ("filename_prefix",),
    "LoadImage": ("image", "upload"),
    "unCLIPConditioning": ("strength", "noise_augmentation"),
    "ConditioningSetArea": ("width", "height", "x", "y", "strength"),
    "CLIPVisionLoader": ("clip_name",),
}  # fmt: skip
# Widgets followed by their "control after generate" value.
_CONTROLLED = {"seed", "noise_seed"}
_CONTROLS = {"fixed", "increment", "decrement", "randomize"}
_NOT_RUN = {"Note", "MarkdownNote"}
_PROMPTS = ("text", "text_g", "text_l")
_COMMENT = re.compile(r"/\*.*?\*/", re.DOTALL)
_MUTED, _BYPASSED = 2, 4


def workflow_graph(workflow: Any) -> dict[str, dict[str, Any]]:
    """The graph ComfyUI runs for ``workflow`` (see the module); a value that is no workflow is refused."""
    if not isinstance(workflow, Mapping) or not isinstance(workflow.get("nodes"), list):
        raise InputError("its ComfyUI workflow has no list of nodes")
    nodes = {str(n["id"]): n for n in workflow["nodes"] if isinstance(n, Mapping) and "id" in n and "type" in n}
    links: dict[Any, tuple[str, int]] = {}
    for link in workflow.get("links") or ():
        if isinstance(link, list) and len(link) >= 3:
            links[link[0]] = (str(link[1]), int(link[2]))
        elif isinstance(link, Mapping) and {"id", "origin_id", "origin_slot"} <= link.keys():
            links[link["id"]] = (str(link["origin_id"]), int(link["origin_slot"]))

    def source(link_id: Any) -> tuple[str, int] | None:
        """Where a link's value comes from, past reroutes and bypassed nodes (each passed once: a loop of them
        leads nowhere)."""
        passed_by: set[str] = set()
        while (found := links.get(link_id)) is not None and found[0] in nodes and found[0] not in passed_by:
            node = nodes[found[0]]
            if node.get("mode") == _MUTED or node["type"] in _NOT_RUN:
                return None
            if node["type"] != "Reroute" and node.get("mode") != _BYPASSED:
                return found
            passed_by.add(found[0])
            outputs = node.get("outputs") or []
            kind = outputs[found[1]].get("type") if 0 <= found[1] < len(outputs) else None
            passed = [i for i in node.get("inputs") or () if node["type"] == "Reroute" or i.get("type") == kind]
            link_id = passed[0].get("link") if passed else None
        return None

    graph: dict[str, dict[str, Any]] = {}
    for node_id, node in nodes.items():
        kind = str(node["type"])
        if (
            kind in _NOT_RUN
            or kind == "Reroute"
            or kind.startswith("Primitive")
            or node.get("mode") in (_MUTED, _BYPASSED)
        ):
            continue
        inputs: dict[str, Any] = {}
        declared = [i for i in node.get("inputs") or () if isinstance(i, Mapping)]
        values = node.get("widgets_values")
        names = WIDGETS.get(kind) or tuple(str(i["name"]) for i in declared if "widget" in i)
        if isinstance(values, list):
            given = list(values)
            for name in names:
                if not given:  # an older node, with fewer widgets than ComfyUI's now
                    break
                inputs[name] = given.pop(0)
                if name in _CONTROLLED and given and (given[0] in _CONTROLS or isinstance(given[0], bool)):
                    given.pop(0)  # its control value (early ComfyUI: a "random seed after every gen" switch)
            if not names and values:
                inputs["widgets_values"] = values  # a node not known here: its values, unnamed
        elif isinstance(values, Mapping):
            inputs.update(values)
        for entry in declared:
            found = source(entry.get("link"))
            if found is None:
                continue
            origin = nodes[found[0]]
            if str(origin["type"]).startswith("Primitive"):  # a primitive gives its value to the widget it feeds
                primitive = origin.get("widgets_values")
                if isinstance(primitive, list) and primitive:
                    inputs[str(entry["name"])] = primitive[0]
                continue
            inputs[str(entry["name"])] = [found[0], found[1]]
        for name in _PROMPTS:
            if isinstance(inputs.get(name), str):
                # The editor takes /* comments */ out of a prompt box's text as it sends the graph to run (seen in
                # real PNGs holding both: the workflow's text with them, the prompt's without).
                inputs[name] = _COMMENT.sub("", inputs[name])
        graph[node_id] = {"class_type": kind, "inputs": inputs}
    return graph
