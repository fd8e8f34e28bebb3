"""The command line and job files for regional prompts and the guidance conditions: ``--region``, ``--pag-scale``,
``--apg``, ``--freeu`` fill their families' input slots (the registry), so the command line names no family."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from sdxl_control import read_recipe
from sdxl_control.adapters.regions import parse_region
from sdxl_control.base.errors import ConditionError
from sdxl_control.cli import main
from sdxl_control.jobs.slots import slot_conditions

RUN = ["--tiny", "--steps", "2", "--seed", "4", "--size", "64x64", "-q"]


def test_the_flags_make_the_conditions_and_the_recipe_re_makes_them(tiny, tmp_path):
    mask = tmp_path / "right: half.png"  # a colon in the file name: the longest existing prefix is the mask
    Image.fromarray(np.tile(np.r_[np.zeros(32), np.full(32, 255)], (64, 1)).astype(np.uint8)).save(mask)
    out, again = tmp_path / "out.png", tmp_path / "again.png"
    assert main(["generate", "two people", *RUN, "--region", "0,0,0.5,1:a woman: red hair", "--region",
                 f"{mask}:an old man", "--region-scale", "0.8", "--pag-scale", "2", "--pag-layers", "mid,up_blocks.0",
                 "--apg", "0", "--apg-momentum", "-0.5", "--freeu", "-o", str(out)]) == 0  # fmt: skip
    conditions = read_recipe(out)["conditions"]
    assert [c["kind"] for c in conditions] == ["region", "region", "pag", "apg", "freeu"]
    left, right, pag, apg, freeu = conditions
    assert (left["box"], left["prompt"], left["scale"]) == ([0.0, 0.0, 0.5, 1.0], "a woman: red hair", 0.8)
    assert right["prompt"] == "an old man" and right["mask"]["file"] == "right: half.png"
    assert (pag["scale"], pag["layers"], apg["eta"], apg["momentum"]) == (2.0, ["mid", "up_blocks.0"], 0.0, -0.5)
    assert (freeu["b1"], freeu["scale"]) == (1.3, 1.0)
    assert main(["generate", "--recipe", str(out), "-o", str(again), "-q"]) == 0
    assert Image.open(again).tobytes() == Image.open(out).tobytes()


def test_options_only_slots_switch_on_by_any_option_and_job_files_fill_them(tiny, tmp_path):
    built = slot_conditions({"region": ["0,0.5,1,1:a dog"]}, {"pag.layers": ["mid"], "freeu.on": True,
                                                              "apg.norm_threshold": 5.0, "region.mode": "masked"})  # fmt: skip
    assert [(c.kind, getattr(c, "prompt", None)) for c in built] == [("region", "a dog"), ("pag", None),
                                                                     ("apg", None), ("freeu", None)]  # fmt: skip
    assert built[1].scale == 3.0 and built[2].norm_threshold == 5.0
    # A job file line, as --dry-run prints it: the conditions recorded as values; `batch` runs it.
    line = {"prompt": "a cat", "steps": 2, "size": [64, 64], "seed": 2,
            "conditions": [{"kind": "region", "prompt": "a dog", "box": [0.0, 0.0, 0.5, 1.0]},
                           {"kind": "pag", "scale": 1.5}, {"kind": "freeu", "scale": 0.5}]}  # fmt: skip
    jobs = tmp_path / "jobs.jsonl"
    jobs.write_text(json.dumps(line) + "\n")
    assert main(["batch", str(jobs), "-o", str(tmp_path / "run"), "--tiny", "-q"]) == 0
    (made,) = (tmp_path / "run").glob("*.png")
    assert [c["kind"] for c in read_recipe(made)["conditions"]] == ["region", "pag", "freeu"]


def test_bad_region_flags_name_the_input_and_the_fix(tiny, tmp_path, capsys):
    out = str(tmp_path / "x.png")
    assert main(["generate", "x", *RUN, "--region", "missing.png:a dog", "-o", out]) == 2
    assert "MASK:PROMPT (an existing mask image) or X0,Y0,X1,Y1:PROMPT" in capsys.readouterr().err
    assert main(["generate", "x", *RUN, "--region-scale", "0.5", "-o", out]) == 2
    assert "--region-scale: options of --region, which is not given" in capsys.readouterr().err
    assert main(["generate", "x", *RUN, "--region", "0.6,0,0.5,1:a dog", "-o", out]) == 2
    assert "x0 < x1" in capsys.readouterr().err


def test_parse_region():
    assert parse_region(" 0 , 0.25, 1,1 :a cat") == {"box": (0.0, 0.25, 1.0, 1.0), "prompt": "a cat"}
    with pytest.raises(ConditionError, match="got 'a cat'"):
        parse_region("a cat")


def _exit_code(argv):
    """The exit code of ``sdxl-control ARGV``, whether the parser refuses it (SystemExit) or the command does."""
    try:
        return main(argv)
    except SystemExit as exc:
        return exc.code


def _conditions(argv):
    from sdxl_control.cli import build_parser
    from sdxl_control.cli.generate import job_spec
    from sdxl_control.jobs.resolvers import HubResolver

    spec, _ = job_spec(build_parser().parse_args(["generate", *argv]), HubResolver())
    return slot_conditions(spec.inputs, spec.set)


def test_freeu_takes_its_four_factors_or_the_published_ones(capsys):
    """``--freeu`` alone: FreeU's published SDXL factors (the class's defaults); ``--freeu B1,B2,S1,S2``: those."""
    from sdxl_control.adapters.freeu import FreeU

    (alone,) = _conditions(["a cat", "--freeu"])
    assert alone == FreeU()
    (given,) = _conditions(["a cat", "--freeu", "1.1,1.2,0.6,0.4", "--freeu-scale", "0.5"])
    assert given == FreeU(b1=1.1, b2=1.2, s1=0.6, s2=0.4, scale=0.5)
    assert _exit_code(["generate", "--freeu", "a cat", "--dry-run", "--tiny"]) == 2  # the prompt read as the factors
    err = capsys.readouterr().err
    assert "--freeu: takes nothing or 4 comma-separated numbers B1,B2,S1,S2, got 'a cat'" in err
    assert "put the prompt first" in err
    assert _exit_code(["generate", "a cat", "--freeu", "1.1,1.2,0.6", "--dry-run", "--tiny"]) == 2
    assert "got '1.1,1.2,0.6'" in capsys.readouterr().err
    assert main(["generate", "a cat", "--freeu", "1,1,1,0", "--dry-run", "--tiny"]) == 2  # FreeU's own check
    assert "FreeU s2 is above 0, got 0.0" in capsys.readouterr().err


def test_the_guidance_flags_make_the_values_their_families_define():
    from sdxl_control.adapters.apg import APG
    from sdxl_control.adapters.pag import PAG
    from sdxl_control.adapters.regions import Region

    argv = ["x", "--pag-scale", "2.5", "--pag-adaptive", "0.1", "--pag-layers", "mid, up_blocks.0.attentions.0",
            "--apg", "0.5", "--apg-threshold", "0", "--apg-momentum", "-0.5", "--region", "0,0,1,0.5:sky",
            "--region-mode", "attention", "--region-window", "0:0.6"]  # fmt: skip
    assert _conditions(argv) == [
        Region("sky", box=(0.0, 0.0, 1.0, 0.5), mode="attention", window=(0.0, 0.6)),
        PAG(scale=2.5, adaptive_scale=0.1, layers=("mid", "up_blocks.0.attentions.0")),
        APG(eta=0.5, norm_threshold=0.0, momentum=-0.5),
    ]
    assert _conditions(["x"]) == []  # no flag: none of them


def test_bad_guidance_flags_are_refused_before_models_load(tiny, tmp_path, capsys):
    out = str(tmp_path / "x.png")
    assert main(["generate", "x", *RUN, "--apg", "-1", "-o", out]) == 2
    assert "APG eta is 0 or more" in capsys.readouterr().err
    assert main(["generate", "x", *RUN, "--pag-adaptive", "-0.5", "-o", out]) == 2
    assert "PAG adaptive_scale is 0 or more" in capsys.readouterr().err
    assert _exit_code(["generate", "x", *RUN, "--region", "0,0,0.5,1:a dog", "--region-mode", "couple", "-o", out]) == 2
    assert "invalid choice: 'couple'" in capsys.readouterr().err


def test_a_job_file_fills_the_slots_as_the_command_line_does(tiny, tmp_path):
    """A job line's ``inputs``/``set`` (the slots, as the command line fills them) and its ``conditions`` (values, as
    a recipe records them) run the same conditions: same pixels."""
    mask = tmp_path / "left.png"
    Image.fromarray(np.tile(np.r_[np.full(32, 255), np.zeros(32)], (64, 1)).astype(np.uint8)).save(mask)
    common = {"prompt": "a cat", "steps": 2, "size": [64, 64], "seed": 3}
    # A region's mask is read from the job file's folder in the fields' form; MASK:PROMPT texts name paths as given.
    slots = {**common, "id": "slots", "inputs": {"region": [{"mask": "left.png", "prompt": "a dog"}, "0,0,1,0.5:sky"]},
             "set": {"region.scale": 0.9, "pag.scale": 1.5, "freeu.on": True}}  # fmt: skip
    values = {**common, "id": "values", "conditions": [
        {"kind": "region", "prompt": "a dog", "mask": "left.png", "scale": 0.9},
        {"kind": "region", "prompt": "sky", "box": [0, 0, 1, 0.5], "scale": 0.9}, {"kind": "pag", "scale": 1.5},
        {"kind": "freeu"}]}  # fmt: skip
    jobs = tmp_path / "jobs.jsonl"
    jobs.write_text("".join(json.dumps(line) + "\n" for line in (slots, values)))
    assert main(["batch", str(jobs), "-o", str(tmp_path / "run"), "--tiny", "-q"]) == 0
    made = {path.stem: path for path in (tmp_path / "run").glob("*.png")}
    assert sorted(made) == ["slots", "values"]
    kinds = [[c["kind"] for c in read_recipe(made[name])["conditions"]] for name in ("slots", "values")]
    assert kinds == [["region", "region", "pag", "freeu"]] * 2
    assert Image.open(made["slots"]).tobytes() == Image.open(made["values"]).tobytes()


def test_a_family_added_with_a_switch_of_values_gets_its_flag_with_no_command_line_code(monkeypatch):
    """The general mechanism behind ``--freeu B1,B2,S1,S2``: a slot of options only declared in the registry, its
    switch taking one number per field it names, is a command-line flag with nothing written for it."""
    from sdxl_control import adapters
    from sdxl_control.adapters import Family, Flag, Slot
    from sdxl_control.adapters.freeu import FreeU

    probe = Slot("probe", "a probe family", None, switches={"on": {}},
                 flags=(Flag("probe", "on", "the probe", "switch", values=("b2", "s1")),))  # fmt: skip
    monkeypatch.setitem(adapters.CONDITION_KINDS, "probe", Family("freeu", "FreeU", slots=(probe,)))
    assert _conditions(["x", "--probe", "1.5,0.7"]) == [FreeU(b2=1.5, s1=0.7)]
    assert _conditions(["x", "--probe"]) == [FreeU()]
    assert _exit_code(["generate", "x", "--probe", "1.5", "--dry-run", "--tiny"]) == 2
