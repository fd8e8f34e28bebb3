"""``sdxl-control models``: the models presets load, present (where, how big) or missing (how to fetch them), and
the models found in ``--models-dir`` installs."""

from __future__ import annotations

import argparse
import sys
from typing import TYPE_CHECKING, Any

from ..base.errors import ModelError

if TYPE_CHECKING:
    from ..jobs.resolvers import Resolver

__all__ = ["add_parser", "run"]


def add_parser(sub: Any, common: argparse.ArgumentParser) -> None:
    models = sub.add_parser(
        "models", help="the models presets need: present or not, their size, how to fetch them", parents=[common]
    )
    models.add_argument(
        "--preset",
        action="append",
        default=[],
        metavar="NAME|FILE",
        help="only this preset's models (repeatable; default: every shipped preset)",
    )
    models.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="as for generate")
    models.add_argument("--fetch", action="store_true", help="download the missing ones from the hub (needs network)")


def run(args: argparse.Namespace, resolver: Resolver) -> int:
    """The presets' models, one line each: present (size, where) or missing (size), then the missing ones' total and
    one fetch command per repository; exit 4 while any is missing."""
    from ..presets import available_presets, load_preset, parse_assignment
    from ..weights.inventory import check, fetch, home_relative, report

    assignments = dict(parse_assignment(a) for a in args.set)
    users: dict[Any, list[str]] = {}  # each model and the presets that load it, in the order first named
    names = args.preset or available_presets()
    for name in names:
        preset = load_preset(name)
        if assignments:
            preset = preset.with_settings(assignments)
        for need in preset.model_needs():
            users.setdefault(need, [])
            if preset.name not in users[need]:
                users[need].append(preset.name)
    if args.fetch:
        for need in users:
            if not check(need).present and need.on_hub:
                sys.stderr.write(f"fetching {need.what} from {need.source}\n")
                fetch(need)
    table, complete = report(users, users=users if len(names) > 1 else None)
    heading = names[0] if len(names) == 1 else f"{len(names)} presets ({', '.join(names)})"
    sys.stdout.write(f"{heading}: {'all present' if complete else 'some missing'}\n{table}\n")
    for kind, files in resolver.folders.listing().items():
        if files:
            sys.stdout.write(f"{kind} in the model folders: {len(files)}\n")
            sys.stdout.write("".join(f"  {home_relative(path)}\n" for path in files))
    if not complete:
        sys.stderr.write("sdxl-control: some models are missing: fetch them as shown, or run with --fetch\n")
    return 0 if complete else ModelError.exit_code
