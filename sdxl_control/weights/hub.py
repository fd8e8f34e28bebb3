"""Finding weights: a local file or folder as given, else a hub id through the Hugging Face cache (one download
attempt when the hub is reachable), else one error that names the model, where it looked and the command that
fetches it.

Example:
    >>> resolve_in("h94/IP-Adapter", "sdxl_models/ip-adapter_sdxl.safetensors")  # doctest: +SKIP
    PosixPath('/root/.cache/huggingface/hub/models--h94--IP-Adapter/snapshots/.../sdxl_models/ip-adapter_sdxl.safetensors')
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from ..base.errors import MissingWeightsError, ModelNotFoundError
from ..base.files import looks_like_hub_id
from .checkpoints import PICKLE_SUFFIXES, refuse_pickle
from .inventory import pattern_for

__all__ = ["resolve_hub", "resolve_source", "resolve_in", "fetch_hint"]


def fetch_hint(repo_id: str, files: list[str] | None = None) -> str:
    # Name the exact files when the caller needs only those (a LoRA, an adapter): no need to fetch a whole repo.
    exact = [f for f in files or [] if not any(c in f for c in "*?[")]
    what = " ".join([repo_id, *exact]) if exact and len(exact) == len(files or []) else repo_id
    return (
        f"fetch it on a machine with network access with `hf download {what}` (it lands in the HF cache, "
        f"which you can copy here), or pass the path of a local diffusers folder or .safetensors file instead"
    )


def _hub_cache_dir(cache_dir: str | os.PathLike[str] | None) -> str:
    if cache_dir is not None:
        return str(cache_dir)
    from huggingface_hub import constants

    return str(constants.HF_HUB_CACHE)


def resolve_hub(
    repo_id: str,
    *,
    allow: list[str],
    ignore: list[str] | None = None,
    revision: str | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
) -> Path:
    """A hub repo's snapshot folder: from the HF cache, else one download attempt, else one clear error."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.utils import HFValidationError

    where: dict[str, Any] = {
        "revision": revision,
        "cache_dir": cache_dir,
        "allow_patterns": allow,
        "ignore_patterns": ignore,
    }
    try:
        return Path(snapshot_download(repo_id, local_files_only=True, **where))
    except HFValidationError:
        raise ModelNotFoundError(f"{repo_id!r} is neither an existing path nor a valid hub model id") from None
    except Exception:  # not in the cache: LocalEntryNotFoundError and friends
        pass
    cache = _hub_cache_dir(cache_dir)
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        raise MissingWeightsError(
            f"model {repo_id!r} is not in the HF cache ({cache}) and HF_HUB_OFFLINE is set; {fetch_hint(repo_id, allow)}"
        ) from None
    try:
        return Path(snapshot_download(repo_id, **where))
    except Exception as exc:
        raise MissingWeightsError(
            f"model {repo_id!r} is not in the HF cache ({cache}) and the hub could not be reached "
            f"({type(exc).__name__}); {fetch_hint(repo_id, allow)}"
        ) from None


def resolve_source(
    source: str | os.PathLike[str],
    *,
    allow: list[str],
    ignore: list[str] | None = None,
    revision: str | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
    allow_pickle: bool = False,
) -> Path:
    """An existing local file or folder as is; otherwise a hub id resolved through the HF cache.

    Pickle files are refused here unless the caller passes ``allow_pickle`` because it reads them with
    ``torch.load(weights_only=True)`` (the published FaceID files are pickles).
    """
    text = str(source)
    path = Path(text).expanduser()
    if path.is_file() and path.suffix in PICKLE_SUFFIXES and not allow_pickle:
        raise refuse_pickle(path)
    if path.exists():
        return path
    if not looks_like_hub_id(text):  # anything but owner/name that does not exist is a missing path
        raise ModelNotFoundError(f"no model at {path}: no such file or folder")
    return resolve_hub(text, allow=allow, ignore=ignore, revision=revision, cache_dir=cache_dir)


def resolve_in(
    source: str | os.PathLike[str], relative: str, *, cache_dir: str | os.PathLike[str] | None = None
) -> Path:
    """A file or folder at ``relative`` inside ``source`` (a local folder or a hub repo, through the HF cache)."""
    # A file is fetched by its exact name (and the fetch hint names it); a folder by everything under it.
    path = resolve_source(source, allow=[pattern_for(relative)], cache_dir=cache_dir) / relative
    if not path.exists():
        raise MissingWeightsError(f"{source} has no {relative}")
    return path
