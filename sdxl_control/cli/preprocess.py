"""``sdxl-control preprocess``: write what a condition will see (a control map, a face's keypoints, the faces
found) from a photo."""

from __future__ import annotations

import argparse
import sys
from typing import TYPE_CHECKING, Any

from ..base.defaults import STRUCTURE_CONTROLS
from ..base.errors import InvalidRequestError
from . import options

if TYPE_CHECKING:
    from ..jobs.resolvers import Resolver

__all__ = ["add_parser", "run", "face_pack"]


def add_parser(sub: Any, common: argparse.ArgumentParser) -> None:
    pre = sub.add_parser(
        "preprocess", help="write the control image a preprocessor makes from a photo", parents=[common]
    )
    pre.add_argument(
        "kind",
        choices=[*STRUCTURE_CONTROLS, "canny", "face", "faces"],
        help="edges (canny), depth, pose: the map the generate flag of that name guides by; face: the keypoint map "
        "InstantID's IdentityNet sees; faces: the photo with each detected face's box, landmarks and score (green: "
        "the largest, which identity methods use)",
    )
    pre.add_argument("photo", help="the photo")
    pre.add_argument("-o", "--output", required=True, help="output image (PNG)")
    pre.add_argument(
        "--size", type=options.size, help="face: draw the keypoints at this output size (default: the photo's)"
    )
    pre.add_argument("--face-pack", help="face, faces: insightface pack name or folder (default antelopev2)")
    pre.add_argument(
        "--tiny", action="store_true", help="tiny random stand-ins for the annotator models and face packs"
    )


def face_pack(args: argparse.Namespace, resolver: Resolver) -> str:
    """The pack named by --face-pack (default: the identity methods' antelopev2), found by ``resolver``."""
    from ..preprocessors.face import IDENTITY_PACK

    return resolver.face_pack(args.face_pack or IDENTITY_PACK)


def run(args: argparse.Namespace, resolver: Resolver) -> int:
    from ..preprocessors import preprocess

    options.library_output(getattr(args, "verbose", False))
    kind = STRUCTURE_CONTROLS[args.kind].preprocessor if args.kind in STRUCTURE_CONTROLS else args.kind
    (output,) = options.output_paths(args.output, 1)
    given: dict[str, Any] = {}
    if kind in ("face", "faces"):
        given = {
            "pack": face_pack(args, resolver),
            **({"size": args.size} if args.size and kind == "face" else {}),
        }
    elif args.size:
        raise InvalidRequestError("--size is for the face keypoint map")
    else:
        given = resolver.preprocess_options(kind)
    preprocess(kind, args.photo, **given).save(output)
    sys.stdout.write(f"{output}\n")
    return 0
