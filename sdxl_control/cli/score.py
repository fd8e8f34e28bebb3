"""``sdxl-control score``: the identity similarity (ArcFace cosine) of images to a face photo."""

from __future__ import annotations

import argparse
import sys
from typing import TYPE_CHECKING, Any

from .preprocess import face_pack

if TYPE_CHECKING:
    from ..resolvers import Resolver

__all__ = ["add_parser", "run"]


def add_parser(sub: Any, common: argparse.ArgumentParser) -> None:
    score = sub.add_parser(
        "score", help="identity similarity of images to a face photo (ArcFace cosine)", parents=[common]
    )
    score.add_argument("images", nargs="+", help="images to score")
    score.add_argument("--face", required=True, metavar="IMG", help="photo of the person")
    score.add_argument("--face-pack", help="insightface pack name or folder (default antelopev2)")


def run(args: argparse.Namespace, resolver: Resolver) -> int:
    from ..preprocessors.face import identity_similarity

    for image in args.images:
        value = identity_similarity(args.face, image, pack=face_pack(args, resolver))
        sys.stdout.write(f"{image}  {value:.4f}\n")
    return 0
