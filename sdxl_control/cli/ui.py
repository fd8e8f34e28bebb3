"""``sdxl-control ui``: the local web page (Gradio) on this machine's models, or the tiny ones."""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING, Any

from ..base.defaults import DEFAULT_BASE, DEFAULT_REFINER, DRAFT_DECODER
from . import options
from .options import count

if TYPE_CHECKING:
    from ..jobs.resolvers import Resolver

__all__ = ["add_parser", "run"]


def add_parser(sub: Any, common: argparse.ArgumentParser) -> None:
    ui = sub.add_parser(
        "ui", help="open the local web page: every condition, live previews, PNGs with recipes", parents=[common]
    )
    ui.add_argument("--tiny", action="store_true", help="serve the built-in tiny models (offline demo)")
    ui.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only)")
    ui.add_argument("--port", type=count, default=7860, help="port (default 7860)")
    ui.add_argument("--base", help=f"base model (default: the preset's, else {DEFAULT_BASE})")
    ui.add_argument("--refiner", help=f"refiner model (default: the preset's, else {DEFAULT_REFINER})")
    ui.add_argument("--device", help="cuda, cpu, mps ... (default: cuda if available)")
    ui.add_argument("--face-pack", help="insightface pack name or folder for the identity methods")
    ui.add_argument(
        "--preview-decoder",
        default=DRAFT_DECODER,
        metavar="MODEL",
        help="the live previews' tiny autoencoder (a TAESD folder, hub id or taesdxl_decoder.safetensors)",
    )


def run(args: argparse.Namespace, resolver: Resolver) -> int:
    from ..ui import UiConfig, build_app

    options.library_output(getattr(args, "verbose", False))
    config = UiConfig(
        resolver=resolver,
        base=args.base,
        refiner=args.refiner,
        face_pack=args.face_pack,
        preview_decoder=args.preview_decoder,
        device=args.device,
    )
    build_app(config).launch(server_name=args.host, server_port=args.port)
    return 0
