"""How the models a job names are found: chosen once per process, handed to :func:`sdxl_control.jobs.spec.resolve`.

:class:`HubResolver` (the default) loads what a job names: hub ids through the Hugging Face cache, local folders and
single files. :class:`TinyResolver` (``--tiny``) swaps every published model a job would load — base, refiner, UNet
checkpoint, each condition's weights, annotators, face analysis packs, draft decoders — for a tiny stand-in of the
same layout, built in code and kept in the cache, so everything runs offline. No front-end knows which is in use.

Example:
    >>> from sdxl_control.jobs.resolvers import resolver_for
    >>> type(resolver_for(tiny=False)).__name__, type(resolver_for(tiny=True)).__name__
    ('HubResolver', 'TinyResolver')
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..base.errors import InputError, InvalidRequestError
from ..weights.model_folders import ModelFolders

if TYPE_CHECKING:
    from ..base.model_refs import ModelRef
    from ..protocol.conditions import Condition

__all__ = ["Resolver", "HubResolver", "TinyResolver", "resolver_for", "tiny_scale"]

# The tiny models' size when a job names none: the published default (1024²) would be slow for no gain. It is also
# the largest area a size runs at under ``--tiny``: SDXL's 1024² scale is the tiny models' 128², so a preset's
# 896x1152 runs as 112x144 (seconds on a CPU, not ~50 s a step).
TINY_SIZE = (128, 128)


def tiny_scale(size: tuple[int, int]) -> tuple[int, int]:
    """``size`` (width, height) brought down to the tiny models' scale: at most :data:`TINY_SIZE`'s area, its aspect
    kept as far as whole multiples of 8 allow; a size already that small is kept.

    Example:
        >>> tiny_scale((896, 1152)), tiny_scale((1024, 1024)), tiny_scale((64, 64))
        ((112, 144), (128, 128), (64, 64))
    """
    width, height = size
    largest = TINY_SIZE[0] * TINY_SIZE[1]
    if width * height <= largest:
        return size
    scale = math.sqrt(largest / (width * height))
    return max(8, round(width * scale / 8) * 8), max(8, round(height * scale / 8) * 8)


@dataclass(frozen=True)
class Resolver:
    """The models a job runs on, as found by one policy; this base class takes every name as given, except a name
    found in ``folders`` (a ComfyUI or A1111 install's models, see :mod:`~sdxl_control.weights.model_folders`).

    Example:
        >>> Resolver().decoder("madebyollin/taesdxl")
        'madebyollin/taesdxl'
    """

    folders: ModelFolders = field(default_factory=ModelFolders, kw_only=True)

    def named(self, kind: str, value: Any) -> Any:
        """``value`` as the path of the ``kind`` model (a :mod:`~sdxl_control.weights.model_folders` kind) it names in
        the model folders; as given where it is a path that exists or no folder holds it."""
        if not isinstance(value, str) or not value or not self.folders.kinds() or Path(value).expanduser().exists():
            return value
        found = self.folders.find(kind, value)
        return value if found is None else str(found)

    def _named_condition(self, condition: Condition) -> Condition:
        named = {f: self.named(kind, getattr(condition, f)) for f, kind in condition.model_fields.items()}
        changed = {f: v for f, v in named.items() if v != getattr(condition, f)}
        return dataclasses.replace(condition, **changed) if changed else condition

    def defaults(self) -> Mapping[str, Any]:
        """Request settings this policy implies where neither the job nor its preset gives one."""
        return {}

    def fit_size(self, size: tuple[int, int]) -> tuple[int, int]:
        """The size (width, height) a request asking for ``size`` runs at under this policy: as asked."""
        return size

    def naming(self) -> Resolver:
        """This policy as a job line records it (``--dry-run``): its defaults, with every model named as given, so
        the line stays valid on any machine and the policy applies again where it runs."""
        return self

    def stages(
        self, base: str, refiner: str | None, unet: ModelRef | None, tiny_seed: int | None = None
    ) -> tuple[str, str | None, ModelRef | None]:
        """(base, refiner, UNet checkpoint) to load; ``tiny_seed`` is set for a recipe made on the tiny models."""
        if tiny_seed is not None:  # a recipe of the tiny models re-runs on them, whatever the policy
            return TinyResolver(tiny_seed).stages(base, refiner, unet)
        return self.named("checkpoints", base), self.named("checkpoints", refiner), unet

    def condition(self, condition: Condition) -> Condition:
        """The condition with its models found by this policy."""
        return self._named_condition(condition)

    def decoder(self, decoder: str | None) -> str | None:
        """A draft or preview decoder (a tiny autoencoder) to load."""
        return self.named("vae_approx", decoder)

    def vae(self, vae: str) -> str:
        """A VAE that replaces the checkpoints' for a call."""
        return self.named("vae", vae)

    def upscaler(self, upscaler: str) -> str:
        """An upscaler model (a built-in resampling mode stays as it is)."""
        return self.named("upscale_models", upscaler)

    def preprocess_options(self, preprocessor: str | None, options: Mapping[str, Any] | None = None) -> dict[str, Any]:
        """Options for a preprocessor (the annotator model it loads)."""
        return dict(options or {})

    def face_pack(self, pack: str) -> str:
        """An insightface pack (name or folder) to analyse faces with."""
        return self.named("insightface", pack)

    def embeddings(self, texts: Sequence[str], emphasis: str, given: Mapping[str, str]) -> dict[str, str]:
        """The textual inversions (name -> file) that ``texts`` (prompt, negative prompt) use, from the model folders'
        embeddings, after those ``given`` (their files found by name there too): ComfyUI's ``embedding:name``
        (``emphasis="comfyui"``), each of which must be found, or A1111's names written as words."""
        from ..protocol.embeddings import a1111_mentions, comfyui_references
        from ..weights.embeddings import a1111_embeddings, comfyui_embedding

        found = {name: self.named("embeddings", file) for name, file in given.items()}
        for name, file in found.items():
            if not Path(file).expanduser().is_file():
                raise InputError(
                    f"embedding {name} ({file}) is not on this machine: put its file in an embeddings folder of the "
                    "install --models-dir names (A1111's embeddings/, ComfyUI's models/embeddings), or give its path"
                )
        folders = self.folders.folders.get("embeddings", ())
        if emphasis == "comfyui":
            for name in (n for text in texts for n in comfyui_references(text)):
                stripped = name.strip(",")  # ComfyUI tries the name as written, then without its commas
                if name in found or stripped in found:
                    continue
                for key in dict.fromkeys((name, stripped)):
                    path = comfyui_embedding(folders, key) if key else None
                    if path is not None:
                        found[key] = str(path)
                        break
                else:
                    looked = ", ".join(str(f) for f in folders) or "none: no install given (--models-dir DIR)"
                    shown = stripped or name
                    raise InvalidRequestError(
                        f"the prompt names embedding:{shown}, found in no embeddings folder (looked in: {looked}): "
                        f"put {shown}.safetensors in one, or take it out of the prompt"
                    )
            return found
        for name, paths in a1111_embeddings(folders).items():
            if name in found or not any(a1111_mentions(text, name) for text in texts):
                continue
            if len(paths) > 1:
                listed = "\n".join(f"  {p}" for p in paths)
                raise InvalidRequestError(
                    f"the prompt uses embedding {name!r}, which is ambiguous: found in\n{listed}\nkeep one, or name "
                    "its file in the job's embeddings"
                )
            found[name] = str(paths[0])
        return found


@dataclass(frozen=True)
class HubResolver(Resolver):
    """What the job names: hub ids (through the Hugging Face cache), local folders and single files.

    Example:
        >>> HubResolver().stages("stabilityai/stable-diffusion-xl-base-1.0", None, None)[0]
        'stabilityai/stable-diffusion-xl-base-1.0'
    """


@dataclass(frozen=True)
class TinyResolver(Resolver):
    """Tiny stand-ins (random weights, the published layouts) for every hub model a job would load; files the user
    gave stay as they are. ``seed`` picks the tiny models' weights.

    Example:
        >>> base, refiner, unet = TinyResolver().stages("stabilityai/stable-diffusion-xl-base-1.0", None, None)
        >>> Path(base).name                                                   # doctest: +SKIP
        'base'
    """

    seed: int = 0

    def defaults(self) -> Mapping[str, Any]:
        return {"size": TINY_SIZE}

    def fit_size(self, size: tuple[int, int]) -> tuple[int, int]:
        return tiny_scale(size)

    def naming(self) -> Resolver:
        return _TinyDefaults(folders=self.folders)

    def stages(
        self, base: str, refiner: str | None, unet: ModelRef | None, tiny_seed: int | None = None
    ) -> tuple[str, str | None, ModelRef | None]:
        from ..testing import tiny_models
        from ..testing.stand_ins import tiny_unet

        seed = self.seed if tiny_seed is None else tiny_seed
        tiny = tiny_models(seed=seed)
        return str(tiny.base), str(tiny.refiner) if refiner is not None else None, tiny_unet(unet, seed)

    def condition(self, condition: Condition) -> Condition:
        from ..testing.stand_ins import tiny_condition

        return tiny_condition(self._named_condition(condition), self.seed)

    def vae(self, vae: str) -> str:
        from ..base.files import looks_like_hub_id
        from ..testing import tiny_models

        named = self.named("vae", vae)  # a file the user has stays; a hub VAE is the tiny base's own
        return str(tiny_models(self.seed).base / "vae") if looks_like_hub_id(named) else named

    def decoder(self, decoder: str | None) -> str | None:
        from ..testing.stand_ins import tiny_decoder

        return tiny_decoder(self.named("vae_approx", decoder), self.seed)

    def preprocess_options(self, preprocessor: str | None, options: Mapping[str, Any] | None = None) -> dict[str, Any]:
        from ..testing.stand_ins import tiny_preprocess_options

        return tiny_preprocess_options(preprocessor, options, self.seed)

    def face_pack(self, pack: str) -> str:
        from ..testing.stand_ins import tiny_pack

        return tiny_pack(self.named("insightface", pack), self.seed)


@dataclass(frozen=True)
class _TinyDefaults(Resolver):
    """The tiny policy's defaults with the models as named: what ``--dry-run --tiny`` prints (``--tiny`` swaps the
    models again where the line runs)."""

    def defaults(self) -> Mapping[str, Any]:
        return TinyResolver().defaults()

    def fit_size(self, size: tuple[int, int]) -> tuple[int, int]:
        return tiny_scale(size)


def resolver_for(tiny: bool, folders: ModelFolders | None = None) -> Resolver:
    """The policy a process runs under: the tiny stand-ins (``--tiny``) or what jobs name; names found in
    ``folders`` (default: the installs ``SDXL_CONTROL_MODELS_DIR`` names) first."""
    folders = ModelFolders.of() if folders is None else folders
    return TinyResolver(folders=folders) if tiny else HubResolver(folders=folders)
