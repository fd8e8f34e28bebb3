"""PAG, APG, FreeU, CFG rescale and Forge Couple's regions read back from A1111/Forge texts and ComfyUI graphs (issue
38 part 5): what maps exactly is read, each approximation is said in the import's notes, nothing is dropped silently;
and the "CFG Rescale" item we write reads back.

The keys and nodes are those the tools write (sources in the project's research notes, issue 38): Forge's builtin
``sd_forge_perturbed_attention`` (``pagi_*``) and ``sd_forge_freeu`` (``freeu_*``), the incantations extension
(``PAG Scale``...), pamparamm/sd-perturbed-attention (``pag_*``), Seshelle/CFG_Rescale_webui (``CFG Rescale``),
ljleb/sd-webui-freeu (``FreeU Stages``...), Forge Couple (``forge_couple_*``); ComfyUI's nodes_pag.py,
nodes_freelunch.py, nodes_apg.py, nodes_model_advanced.py (RescaleCFG) at comfyanonymous/ComfyUI a125cd8. No public
PNG or graph with these keys and a known provenance was found in the library: the texts and graphs here are built by
hand in the tools' written forms.
"""

from __future__ import annotations

import pytest

from sdxl_control.adapters.apg import APG
from sdxl_control.adapters.freeu import FreeU
from sdxl_control.adapters.pag import PAG
from sdxl_control.adapters.regions import Region
from sdxl_control.base.stages import Stage, Window
from sdxl_control.jobs.comfy_workflow import workflow_graph
from sdxl_control.jobs.png_guidance import forge_window
from sdxl_control.jobs.png_import import read_a1111, read_comfyui
from sdxl_control.records.infotext import parameters_text


def _notes(imported, start: str) -> str:
    return " | ".join(line for line in imported.unmapped if line.startswith(start))


def _only(imported, kind):
    found = [c for c in imported.conditions if isinstance(c, kind)]
    assert len(found) == 1, imported.conditions
    return found[0]


def test_forge_pag_is_read_with_its_window_in_its_steps():
    text = "a fox\nSteps: 20, pagi_enabled: True, pagi_scale: 2.5, pagi_attenuation: 0, pagi_start_step: 0.25, " \
        "pagi_end_step: 0.5"  # fmt: skip
    imported = read_a1111(text)
    pag = _only(imported, PAG)
    assert (pag.scale, pag.adaptive_scale, pag.layers) == (2.5, 0.0, ("mid",))
    # Forge acts where start <= i/(n-1) <= end: with 20 steps, steps 5..9; ours must hold exactly those.
    forge = [i for i in range(20) if 0.25 <= i / 19 <= 0.5]
    assert [i for i in range(20) if pag.window.contains(i, 20)] == forge == list(range(5, 10))
    assert not [line for line in imported.unmapped if line.startswith("pagi")]  # exact: nothing to say


def test_forge_window_matches_forges_rule_for_many_windows():
    for steps in (2, 3, 7, 20, 31):
        for start, end in ((0.0, 0.3), (0.1, 0.9), (0.5, 1.0), (0.33, 0.34), (0.0, 1.0)):
            forge = [i for i in range(steps) if start <= i / (steps - 1) <= end]
            if not forge:
                continue
            window = forge_window(start, end, steps)
            assert [i for i in range(steps) if window.contains(i, steps)] == forge, (steps, start, end)


def test_forge_pag_disabled_or_attenuated():
    assert not read_a1111("a\nSteps: 20, pagi_enabled: False, pagi_scale: 3").conditions
    imported = read_a1111("a\nSteps: 20, pagi_enabled: True, pagi_scale: 3, pagi_attenuation: 50")
    assert _only(imported, PAG).scale == 3.0
    assert "scale stays constant" in _notes(imported, "pagi_attenuation: 50")
    assert "no equivalent" not in " ".join(imported.unmapped)


def test_incantations_pag_is_read_on_the_whole_mid_block_and_says_so():
    text = "a\nSteps: 10, PAG Active: True, PAG SANF: False, PAG Scale: 2, PAG Start Step: 2, PAG End Step: 5"
    imported = read_a1111(text)
    pag = _only(imported, PAG)
    assert pag.scale == 2.0 and pag.layers == ("mid",)
    assert [i for i in range(10) if pag.window.contains(i, 10)] == [2, 3, 4, 5]
    assert "only the mid block's first transformer block" in _notes(imported, "PAG Scale")


def test_pamparamm_adaptive_scale_is_diffusers_after_its_fourth_power():
    text = "a\nSteps: 10, pag_enabled: True, pag_scale: 4, pag_adaptive_scale: 0.5, pag_block: middle, pag_block_id: 0"
    pag = _only(read_a1111(text), PAG)
    # pamparamm: s - s*a**4*(1000 - t); diffusers: s - adaptive*(1000 - t).
    for t in (999, 700, 10):
        assert 4 - 4 * 0.5**4 * (1000 - t) == pytest.approx(pag.scale - pag.adaptive_scale * (1000 - t))


def test_forge_freeu_reads_its_factors_and_says_it_is_v2():
    text = "a\nSteps: 20, freeu_enabled: True, freeu_b1: 1.3, freeu_b2: 1.4, freeu_s1: 0.9, freeu_s2: 0.2, " \
        "freeu_start: 0, freeu_end: 1"  # fmt: skip
    imported = read_a1111(text)
    freeu = _only(imported, FreeU)
    assert (freeu.b1, freeu.b2, freeu.s1, freeu.s2, freeu.window) == (1.3, 1.4, 0.9, 0.2, Window())
    assert "FreeU_V2" in _notes(imported, "freeu_b1")


def test_ljleb_freeu_stages():
    text = ('a\nSteps: 20, FreeU Stages: "[{\\"backbone_factor\\": 1.1, \\"skip_factor\\": 0.6}, '
            '{\\"backbone_factor\\": 1.2, \\"skip_factor\\": 0.4}, {}]", FreeU Schedule: "0.0, 1.0, 0.0", '
            "FreeU Version: 2")  # fmt: skip
    imported = read_a1111(text)
    freeu = _only(imported, FreeU)
    assert (freeu.b1, freeu.s1, freeu.b2, freeu.s2) == (1.1, 0.6, 1.2, 0.4)
    assert "close, not equal" in _notes(imported, "FreeU Stages")


def test_cfg_rescale_keys_and_our_apg_item():
    for key in ("CFG Rescale", "CFG Rescale φ", "CFG Rescale phi"):
        imported = read_a1111(f"a\nSteps: 20, CFG scale: 7, {key}: 0.7")
        assert imported.settings["guidance_rescale"] == 0.7
        assert "close, not equal" in _notes(imported, key)
    apg = _only(read_a1111('a\nSteps: 20, CFG scale: 7, APG: "eta 0.5, threshold 10, momentum -0.5"'), APG)
    assert (apg.eta, apg.norm_threshold, apg.momentum) == (0.5, 10.0, -0.5)
    assert "not 'eta E" in _notes(read_a1111("a\nSteps: 20, CFG scale: 7, APG: strong"), "APG: strong")


def test_the_cfg_rescale_we_write_reads_back():
    recipe = {
        "prompt": "a fox", "steps": 20, "guidance": 7.0, "seed": 1, "size": [1024, 768], "version": "0.3.0",
        "scheduler": {"class": "EulerDiscreteScheduler", "config": {}}, "models": {"base": {"name": "m"}},
        "guidance_rescale": 0.7,
    }  # fmt: skip
    text = parameters_text(recipe)
    assert "CFG Rescale: 0.7" in text
    assert read_a1111(text).settings["guidance_rescale"] == 0.7
    assert "CFG Rescale" not in parameters_text({**recipe, "guidance_rescale": 0.0})


def test_bad_values_are_said_not_a_crash():
    imported = read_a1111("a\nSteps: 20, freeu_enabled: True, freeu_b1: 0, pagi_scale: lots")
    assert "not read" in _notes(imported, "freeu_b1") and "not a number" in _notes(imported, "pagi_scale: lots")
    assert not any(isinstance(c, FreeU) for c in imported.conditions)


def test_forge_couple_basic_tiles_as_forge_couple_maps_them():
    text = ("background\nleft cat\nright dog\nSteps: 20, Size: 1000x600, forge_couple: True, forge_couple_mode: Basic, "
            "forge_couple_separator: \\n, forge_couple_direction: Horizontal, forge_couple_background: First Line, "
            "forge_couple_background_weight: 0.5, forge_couple_common_parser: { }")  # fmt: skip
    imported = read_a1111(text)
    regions = [c for c in imported.conditions if isinstance(c, Region)]
    # Forge Couple (lib_couple/mapping.py basic): tile size ceil((W-1)/count) pixels; background weight 0.5.
    tile = (1000 - 1) // 2 + 1
    assert [(r.prompt, r.box, r.scale, r.mode) for r in regions] == [
        ("left cat", (0.0, 0.0, tile / 1000, 1.0), 1.0, "attention"),
        ("right dog", (tile / 1000, 0.0, 1.0, 1.0), 1.0, "attention"),
        ("background", (0.0, 0.0, 1.0, 1.0), 0.5, "attention"),
    ]
    assert "forge_couple" in " ".join(imported.unmapped)
    vertical = read_a1111(text.replace("Horizontal", "Vertical").replace("First Line", "None"))
    assert [r.box for r in vertical.conditions] == [(0.0, 0.0, 1.0, 1 / 3), (0.0, 1 / 3, 1.0, 2 / 3),
                                                    (0.0, 2 / 3, 1.0, 1.0)]  # fmt: skip
    assert {r.scale for r in vertical.conditions} == {1.25}


def test_forge_couple_advanced_and_mask_modes():
    text = ('a\nb\nSteps: 20, Size: 1024x1024, forge_couple: True, forge_couple_mode: Advanced, '
            'forge_couple_separator: \\n, forge_couple_mapping: "[[0.0, 0.5, 0.0, 1.0, 1.0], [0.5, 1.0, 0.0, 1.0, 0.8]]"')  # fmt: skip
    regions = read_a1111(text).conditions
    assert [(r.prompt, r.box, r.scale) for r in regions] == [("a", (0.0, 0.0, 0.5, 1.0), 1.0),
                                                              ("b", (0.5, 0.0, 1.0, 1.0), 0.8)]  # fmt: skip
    masked = read_a1111("a\nb\nSteps: 20, forge_couple: True, forge_couple_mode: Mask")
    assert not masked.conditions and "not in the PNG" in _notes(masked, "forge_couple_mode: Mask")


def _graph(*chain: tuple[str, str, dict], refiner: bool = False) -> dict:
    """A ComfyUI SDXL graph whose sampler's model comes through ``chain`` (id, class_type, inputs; each takes the
    model of the one before)."""
    nodes = {
        "3": {"class_type": "KSampler", "inputs": {"seed": 1, "steps": 20, "cfg": 7.0, "sampler_name": "euler",
              "scheduler": "normal", "denoise": 1.0, "model": [chain[-1][0] if chain else "4", 0],
              "positive": ["6", 0], "negative": ["7", 0], "latent_image": ["5", 0]}},
        "4": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "sd_xl_base_1.0.safetensors"}},
        "5": {"class_type": "EmptyLatentImage", "inputs": {"width": 1024, "height": 1024, "batch_size": 1}},
        "6": {"class_type": "CLIPTextEncode", "inputs": {"text": "a fox", "clip": ["4", 1]}},
        "7": {"class_type": "CLIPTextEncode", "inputs": {"text": "blur", "clip": ["4", 1]}},
    }  # fmt: skip
    previous = "4"
    for node_id, kind, inputs in chain:
        nodes[node_id] = {"class_type": kind, "inputs": {**inputs, "model": [previous, 0]}}
        previous = node_id
    return nodes


def test_comfyui_guidance_nodes_on_the_model_chain():
    graph = _graph(
        ("10", "PerturbedAttentionGuidance", {"scale": 2.0}),
        ("11", "FreeU_V2", {"b1": 1.3, "b2": 1.4, "s1": 0.9, "s2": 0.2}),
        ("12", "APG", {"eta": 0.5, "norm_threshold": 5.0, "momentum": -0.5}),
        ("13", "RescaleCFG", {"multiplier": 0.7}),
    )
    imported = read_comfyui(graph)
    pag, freeu, apg = _only(imported, PAG), _only(imported, FreeU), _only(imported, APG)
    assert (pag.scale, pag.layers, pag.stage) == (2.0, ("mid",), Stage.BASE)
    assert (freeu.b1, freeu.b2, freeu.s1, freeu.s2) == (1.3, 1.4, 0.9, 0.2)
    assert (apg.eta, apg.norm_threshold, apg.momentum) == (0.5, 5.0, -0.5)
    assert imported.settings["guidance_rescale"] == 0.7
    assert "structure-aware" in _notes(imported, "FreeU_V2 (node 11)")
    assert "x0" in _notes(imported, "APG (node 12)")
    assert "v-prediction" in _notes(imported, "RescaleCFG (node 13)")
    assert not _notes(imported, "PerturbedAttentionGuidance")  # ComfyUI's PAG is diffusers' on "mid": nothing to say


def test_comfyui_defaults_and_the_ui_workflow_form():
    imported = read_comfyui(_graph(("10", "FreeU", {}), ("11", "PerturbedAttentionGuidance", {})))
    freeu = _only(imported, FreeU)
    assert (freeu.b1, freeu.b2, freeu.s1, freeu.s2) == (1.1, 1.2, 0.9, 0.2)  # ComfyUI's FreeU defaults
    assert _only(imported, PAG).scale == 3.0
    # The UI workflow's widgets_values, in the nodes' input order, become the same inputs.
    workflow = {
        "nodes": [
            {"id": 10, "type": "APG", "inputs": [{"name": "model", "link": 1}], "widgets_values": [0.5, 5.0, -0.5]},
            {"id": 11, "type": "PerturbedAttentionGuidance", "inputs": [{"name": "model", "link": 2}],
             "widgets_values": [2.5]},
            {"id": 4, "type": "CheckpointLoaderSimple", "inputs": [], "widgets_values": ["m.safetensors"]},
        ],
        "links": [[1, 4, 0, 10, 0, "MODEL"], [2, 10, 0, 11, 0, "MODEL"]],
    }  # fmt: skip
    graph = workflow_graph(workflow)
    assert graph["10"]["inputs"]["eta"] == 0.5 and graph["10"]["inputs"]["momentum"] == -0.5
    assert graph["11"]["inputs"]["scale"] == 2.5


def _regional_graph(*extra: tuple[str, str, dict]) -> dict:
    """ComfyUI's area-composition form: a base prompt (node 6) combined with regional chains (node 12 feeds the
    sampler); ``extra`` adds or replaces nodes."""
    nodes = _graph()
    nodes["3"]["inputs"]["positive"] = ["12", 0]
    nodes["5"]["inputs"].update(width=1024, height=768)
    nodes.update({
        "8": {"class_type": "CLIPTextEncode", "inputs": {"text": "a man in blue", "clip": ["4", 1]}},
        "9": {"class_type": "ConditioningSetArea", "inputs": {"conditioning": ["8", 0], "width": 500, "height": 768,
                                                             "x": 100, "y": 0, "strength": 1.5}},
        "12": {"class_type": "ConditioningCombine", "inputs": {"conditioning_1": ["6", 0],
                                                              "conditioning_2": ["9", 0]}},
    })  # fmt: skip
    for node_id, kind, inputs in extra:
        nodes[node_id] = {"class_type": kind, "inputs": inputs}
    return nodes


def test_comfyui_area_chains_become_regions_with_comfyuis_latent_area():
    imported = read_comfyui(_regional_graph())
    assert imported.prompt == "a fox"  # the chain without an area: the base prompt
    region = _only(imported, Region)
    # ComfyUI (nodes.py ConditioningSetArea): area = (h//8, w//8, y//8, x//8) in latent units of the 128x96 latent.
    x, w = 100 // 8, 500 // 8
    assert region.box == (x / 128, 0.0, (x + w) / 128, 1.0) and region.box[0] * 1024 == 96
    assert (region.prompt, region.scale, region.mode, region.window) == ("a man in blue", 1.5, "masked", Window())
    assert len(imported.unmapped) == 1  # the noise note: every node read


def test_comfyui_mask_chains():
    solid = _regional_graph(
        ("9", "ConditioningSetMask", {"conditioning": ["13", 0], "mask": ["14", 0], "strength": 0.8,
                                      "set_cond_area": "default"}),
        ("13", "ConditioningSetTimestepRange", {"conditioning": ["8", 0], "start": 0.0, "end": 0.5}),
        ("14", "SolidMask", {"value": 0.5, "width": 512, "height": 512}),
    )  # fmt: skip
    imported = read_comfyui(solid)
    region = _only(imported, Region)
    # A solid mask's value multiplies ComfyUI's mult (mask * mask_strength * strength) over the whole latent.
    assert region.box == (0.0, 0.0, 1.0, 1.0) and region.scale == pytest.approx(0.4)
    assert region.window == Window(0.0, 0.5)
    assert "sigmas" in _notes(imported, "ConditioningSetTimestepRange (node 13)")
    loaded = _regional_graph(
        ("9", "ConditioningSetMask", {"conditioning": ["8", 0], "mask": ["14", 0], "strength": 1.0,
                                      "set_cond_area": "default"}),
        ("14", "LoadImageMask", {"image": "left.png", "channel": "alpha"}),
    )  # fmt: skip
    imported = read_comfyui(loaded)
    assert not imported.conditions and imported.prompt == "a fox"
    assert "'left.png'" in _notes(imported, "ConditioningSetMask (node 9)")
    assert "--region" in _notes(imported, "ConditioningSetMask (node 9)")


def test_comfyui_percentage_area():
    imported = read_comfyui(_regional_graph(
        ("9", "ConditioningSetAreaPercentage", {"conditioning": ["8", 0], "width": 0.5, "height": 1.0, "x": 0.5,
                                                "y": 0.0, "strength": 1.0}),
    ))  # fmt: skip
    assert _only(imported, Region).box == (0.5, 0.0, 1.0, 1.0)


def test_comfyuis_real_area_composition_png_reads_as_its_regions():
    """ComfyUI's area-composition example (tests/data/real_pngs/night_evening_day_morning_cropped.png, from
    d3x-at/sd-parsers @ 0949676, see PROVENANCE.md): four ConditioningSetArea chains combined with a base prompt.
    The expected boxes are computed here from the file's own nodes by ComfyUI's rule (nodes.py ConditioningSetArea:
    area (h//8, w//8, y//8, x//8) in latent units, comfyanonymous/ComfyUI a125cd8)."""
    import json
    from pathlib import Path

    from PIL import Image

    from sdxl_control.jobs.png_import import read_image_settings

    path = Path(__file__).parent / "data" / "real_pngs" / "night_evening_day_morning_cropped.png"
    graph = json.loads(Image.open(path).text["prompt"])
    imported = read_image_settings(path)
    latent = graph["5"]["inputs"]
    lw, lh = latent["width"] // 8, latent["height"] // 8
    expected = {}
    for node in graph.values():
        if node["class_type"] == "ConditioningSetArea":
            v = node["inputs"]
            x, y, w, h = v["x"] // 8, v["y"] // 8, v["width"] // 8, v["height"] // 8
            text = graph[v["conditioning"][0]]["inputs"]["text"]
            box = (x / lw, y / lh, min(x + w, lw) / lw, min(y + h, lh) / lh)
            expected[text] = (box, v["strength"])
    regions = {r.prompt: (r.box, r.scale) for r in imported.conditions if isinstance(r, Region)}
    assert len(expected) == 4 and regions == expected
    assert imported.prompt == graph["6"]["inputs"]["text"]  # the chain without an area
    assert {r.mode for r in imported.conditions} == {"masked"}


def test_a_guidance_node_on_the_refiners_model_chain_acts_in_the_refiners_stage():
    graph = _graph()
    graph["3"]["class_type"] = "KSamplerAdvanced"
    graph["3"]["inputs"].update(noise_seed=1, start_at_step=0, end_at_step=16, add_noise="enable")
    graph.update({
        "12": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "sd_xl_refiner_1.0.safetensors"}},
        "13": {"class_type": "PerturbedAttentionGuidance", "inputs": {"scale": 1.5, "model": ["12", 0]}},
        "14": {"class_type": "RescaleCFG", "inputs": {"multiplier": 0.5, "model": ["13", 0]}},
        "15": {"class_type": "KSamplerAdvanced", "inputs": {
            "add_noise": "disable", "noise_seed": 1, "steps": 20, "cfg": 7.0, "sampler_name": "euler",
            "scheduler": "normal", "start_at_step": 16, "end_at_step": 10000, "model": ["14", 0],
            "positive": ["6", 0], "negative": ["7", 0], "latent_image": ["3", 0]}},
    })  # fmt: skip
    imported = read_comfyui(graph)
    pag = _only(imported, PAG)
    assert (pag.scale, pag.stage) == (1.5, Stage.REFINER)
    assert "guidance_rescale" not in imported.settings and "base's chain only" in _notes(imported, "RescaleCFG")


def test_two_prompts_combined_without_regions_stay_as_before():
    graph = _regional_graph(("9", "CLIPTextEncode", {"text": "a man in blue", "clip": ["4", 1]}))
    imported = read_comfyui(graph)
    assert not imported.conditions and imported.prompt == "a fox"
    assert "not read here" in _notes(imported, "ConditioningCombine (node 12)")


def test_what_we_write_for_pag_apg_freeu_and_rescale_reads_back(generator):
    """The A1111 text of an image made with PAG (Forge's items), APG (ours), FreeU (Forge's) and CFG rescale reads
    back as the same conditions and setting; FreeU says Forge's is V2, nothing else is noted."""
    made = generator.generate("a fox", steps=4, size=(64, 64), seed=2, guidance=5.0, guidance_rescale=0.5,
                              conditions=[PAG(scale=2.0, window=(0.0, 0.5)), APG(eta=0.0, momentum=-0.5),
                                          FreeU(b1=1.1, s2=0.4)], progress_bar=False)  # fmt: skip
    imported = read_a1111(parameters_text(made.images[0].recipe))
    pag, apg, freeu = _only(imported, PAG), _only(imported, APG), _only(imported, FreeU)
    assert (pag.scale, pag.layers, pag.adaptive_scale) == (2.0, ("mid",), 0.0)
    assert [i for i in range(4) if pag.window.contains(i, 4)] == [0, 1]
    assert (apg.eta, apg.norm_threshold, apg.momentum) == (0.0, 15.0, -0.5)
    assert (freeu.b1, freeu.b2, freeu.s1, freeu.s2) == (1.1, 1.4, 0.9, 0.4)
    assert imported.settings["guidance_rescale"] == 0.5
    assert not [line for line in imported.unmapped if line.startswith(("pagi", "APG"))]
