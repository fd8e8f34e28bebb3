"""``sdxl-control presets``: the shipped presets, what each does and the inputs it takes."""

from __future__ import annotations

import argparse
import sys
import textwrap
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ..jobs.resolvers import Resolver

__all__ = ["add_parser", "run"]


def add_parser(sub: Any, common: argparse.ArgumentParser) -> None:
    sub.add_parser("presets", help="list the presets: what each does and the inputs it takes", parents=[common])


def run(args: argparse.Namespace, resolver: Resolver) -> int:
    from ..presets import available_presets, load_preset
    from .generate import INPUT_FLAGS

    for name in available_presets():
        preset = load_preset(name, check=False)
        sys.stdout.write(f"{name}\n")
        sys.stdout.write(textwrap.fill(preset.description, 100, initial_indent="    ", subsequent_indent="    ") + "\n")
        for spec in preset.inputs.values():
            need = "required" if spec.required else "optional"
            many = ", repeatable" if spec.many else ""
            value = "TEXT" if spec.text else "FILE"
            # The inputs with no flag of their own (a person's text, a second face) are given as --input NAME=VALUE.
            flag = f"--{spec.name.replace('_', '-')} " if spec.name in INPUT_FLAGS else f"--input {spec.name}="
            sys.stdout.write(f"    {flag}{value}  ({need}{many}) {spec.help}\n")
    return 0
