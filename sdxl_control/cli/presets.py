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

    for name in available_presets():
        preset = load_preset(name, check=False)
        sys.stdout.write(f"{name}\n")
        sys.stdout.write(textwrap.fill(preset.description, 100, initial_indent="    ", subsequent_indent="    ") + "\n")
        for spec in preset.inputs.values():
            need = "required" if spec.required else "optional"
            many = ", repeatable" if spec.many else ""
            sys.stdout.write(f"    --{spec.name.replace('_', '-')} FILE  ({need}{many}) {spec.help}\n")
    return 0
