"""``sdxl-control score``: the identity similarity (ArcFace cosine) of images to a face photo."""

from __future__ import annotations

import argparse
import sys
from typing import TYPE_CHECKING, Any

from .preprocess import face_pack

if TYPE_CHECKING:
    from ..jobs.resolvers import Resolver

__all__ = ["add_parser", "run"]


def add_parser(sub: Any, common: argparse.ArgumentParser) -> None:
    score = sub.add_parser(
        "score", help="identity similarity of images to a face photo (ArcFace cosine)", parents=[common]
    )
    score.add_argument("images", nargs="+", help="images to score")
    score.add_argument("--face", required=True, metavar="IMG", help="photo of the person")
    score.add_argument("--face-pack", help="insightface pack name or folder (default antelopev2)")
    score.add_argument("--tiny", action="store_true", help="a tiny stand-in for the face pack (offline demo)")


def run(args: argparse.Namespace, resolver: Resolver) -> int:
    """Each image's score on its line; an image without a face (or unreadable) is reported on stderr, and the others
    are scored still: the exit code is then that of the first problem."""
    from ..base.errors import FaceNotFoundError, InputError
    from ..preprocessors.face import analyze_faces, identity_similarity

    pack = face_pack(args, resolver)
    analyze_faces([args.face], pack)  # the reference photo's own problems end the command at once
    first_problem = 0
    for image in args.images:
        try:
            value = identity_similarity(args.face, image, pack=pack)
        except (FaceNotFoundError, InputError) as exc:
            sys.stdout.write(f"{image}  -\n")
            sys.stderr.write(f"sdxl-control: {exc}\n")
            first_problem = first_problem or exc.exit_code
            continue
        sys.stdout.write(f"{image}  {value:.4f}\n")
    return first_problem
