"""The process's caches of loaded models and read weights, in one registry under one policy: each keeps its last few
entries (least recently used goes first), and :func:`clear_caches` empties every one of them. The page and batch
workers call it when they switch to another model set (:class:`sdxl_control.passes.generator.LastLoaded`), so
ControlNets, encoders and weights that the old set used are freed; a user's script may call it too.

Example:
    >>> encoders: KeyedCache[str] = KeyedCache("encoders", size=2)
    >>> encoders.get("a", lambda: "built"), len(encoders)
    ('built', 1)
    >>> clear_caches(); len(encoders)
    0
"""

from __future__ import annotations

import functools
import gc
import weakref
from collections import OrderedDict
from collections.abc import Callable, Hashable
from pathlib import Path
from typing import Any, Generic, Protocol, TypeVar

__all__ = ["KeyedCache", "PerModelCache", "process_cached", "clear_caches"]

T = TypeVar("T")
F = TypeVar("F", bound=Callable[..., Any])


class _Clearable(Protocol):
    def clear(self) -> None: ...


# Caches live as long as their modules: a plain list, not weak references.
_REGISTRY: list[_Clearable] = []


class KeyedCache(Generic[T]):
    """The last ``size`` values built for distinct keys; ``name`` says what it holds.

    Example:
        >>> controlnets: KeyedCache[object] = KeyedCache("ControlNets", size=4)
        >>> controlnets.get(("canny", "cuda"), lambda: object()) is controlnets.get(("canny", "cuda"), object)
        True
    """

    def __init__(self, name: str, size: int) -> None:
        self.name, self.size = name, size
        self._items: OrderedDict[Hashable, T] = OrderedDict()
        _REGISTRY.append(self)

    def get(self, key: Hashable, build: Callable[[], T]) -> T:
        if key in self._items:
            self._items.move_to_end(key)
            return self._items[key]
        value = build()
        while len(self._items) >= self.size:
            self._items.popitem(last=False)
        self._items[key] = value
        return value

    def clear(self) -> None:
        self._items.clear()

    def __len__(self) -> int:
        return len(self._items)


class PerModelCache(Generic[T]):
    """What a condition builds from a weights file for one model (a converted projection, an encoder placed on the
    device), kept while the file is unchanged: the last ``size`` per model, and weakly, so a dropped model frees them.

    Example:
        >>> _ENCODERS: PerModelCache[Any] = PerModelCache(size=2)
        >>> _ENCODERS.get(unet, path, (str(device),), lambda: build(path))  # doctest: +SKIP
    """

    def __init__(self, size: int) -> None:
        self.size = size
        self._items: weakref.WeakKeyDictionary[Any, dict[tuple[Any, ...], T]] = weakref.WeakKeyDictionary()
        _REGISTRY.append(self)

    def get(self, model: Any, path: Path, extra: tuple[Any, ...], build: Callable[[], T]) -> T:
        stat = path.stat()
        key = (str(path.resolve()), stat.st_size, stat.st_mtime_ns, *extra)
        items = self._items.setdefault(model, {})
        if key not in items:
            value = build()
            while len(items) >= self.size:
                items.pop(next(iter(items)))
            items[key] = value
        return items[key]

    def clear(self) -> None:
        self._items.clear()


class _CachedFunction:
    def __init__(self, function: Any) -> None:
        self.function = function

    def clear(self) -> None:
        self.function.cache_clear()


def process_cached(size: int) -> Callable[[F], F]:
    """``functools.lru_cache(size)``, registered so that :func:`clear_caches` empties it too.

    Example:
        >>> @process_cached(2)
        ... def square(x: int) -> int: return x * x
        >>> square(3)
        9
    """

    def wrap(function: F) -> F:
        cached = functools.lru_cache(maxsize=size)(function)
        _REGISTRY.append(_CachedFunction(cached))
        return cached  # type: ignore[return-value]

    return wrap


def clear_caches() -> None:
    """Empty every process cache, then give the memory back (Python's collector, and the CUDA allocator's cache)."""
    for cache in _REGISTRY:
        cache.clear()
    gc.collect()
    import torch

    if torch.cuda.is_available():
        torch.cuda.empty_cache()
