"""How the models a job names are found: chosen once per process, handed to :func:`sdxl_control.spec.resolve`.

:class:`HubResolver` (the default) loads what a job names: hub ids through the Hugging Face cache, local folders and
single files. :class:`TinyResolver` (``--tiny``) swaps every published model a job would load — base, refiner, UNet
checkpoint, each condition's weights, annotators, face analysis packs, draft decoders — for a tiny stand-in of the
same layout, built in code and kept in the cache, so everything runs offline. No front-end knows which is in use.

Example:
    >>> from sdxl_control.resolvers import resolver_for
    >>> type(resolver_for(tiny=False)).__name__, type(resolver_for(tiny=True)).__name__
    ('HubResolver', 'TinyResolver')
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .conditions import Condition
    from .model_refs import ModelRef

__all__ = ["Resolver", "HubResolver", "TinyResolver", "resolver_for"]

# The tiny models' size when a job names none: the published default (1024²) would be slow for no gain.
TINY_SIZE = (128, 128)


@dataclass(frozen=True)
class Resolver:
    """The models a job runs on, as found by one policy; this base class takes every name as given.

    Example:
        >>> Resolver().decoder("madebyollin/taesdxl")
        'madebyollin/taesdxl'
    """

    def defaults(self) -> Mapping[str, Any]:
        """Request settings this policy implies where neither the job nor its preset gives one."""
        return {}

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
        return base, refiner, unet

    def condition(self, condition: Condition) -> Condition:
        """The condition with its models found by this policy."""
        return condition

    def decoder(self, decoder: str | None) -> str | None:
        """A draft or preview decoder (a tiny autoencoder) to load."""
        return decoder

    def preprocess_options(self, preprocessor: str | None, options: Mapping[str, Any] | None = None) -> dict[str, Any]:
        """Options for a preprocessor (the annotator model it loads)."""
        return dict(options or {})

    def face_pack(self, pack: str) -> str:
        """An insightface pack (name or folder) to analyse faces with."""
        return pack


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

    def naming(self) -> Resolver:
        return _TinyDefaults()

    def stages(
        self, base: str, refiner: str | None, unet: ModelRef | None, tiny_seed: int | None = None
    ) -> tuple[str, str | None, ModelRef | None]:
        from .testing import tiny_models
        from .testing.stand_ins import tiny_unet

        seed = self.seed if tiny_seed is None else tiny_seed
        tiny = tiny_models(seed=seed)
        return str(tiny.base), str(tiny.refiner) if refiner is not None else None, tiny_unet(unet, seed)

    def condition(self, condition: Condition) -> Condition:
        from .testing.stand_ins import tiny_condition

        return tiny_condition(condition, self.seed)

    def decoder(self, decoder: str | None) -> str | None:
        from .testing.stand_ins import tiny_decoder

        return tiny_decoder(decoder, self.seed)

    def preprocess_options(self, preprocessor: str | None, options: Mapping[str, Any] | None = None) -> dict[str, Any]:
        from .testing.stand_ins import tiny_preprocess_options

        return tiny_preprocess_options(preprocessor, options, self.seed)

    def face_pack(self, pack: str) -> str:
        from .testing.stand_ins import tiny_pack

        return tiny_pack(pack, self.seed)


@dataclass(frozen=True)
class _TinyDefaults(Resolver):
    """The tiny policy's defaults with the models as named: what ``--dry-run --tiny`` prints (``--tiny`` swaps the
    models again where the line runs)."""

    def defaults(self) -> Mapping[str, Any]:
        return TinyResolver().defaults()


def resolver_for(tiny: bool) -> Resolver:
    """The policy a process runs under: the tiny stand-ins (``--tiny``) or what jobs name."""
    return TinyResolver() if tiny else HubResolver()
