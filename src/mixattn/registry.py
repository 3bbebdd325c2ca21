"""A small named registry, so that new layer kinds and attention backends plug in
without editing the model file (the llm-foundry idea, without its sprawl)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Generic, TypeVar

T = TypeVar("T")


class Registry(Generic[T]):
    """Maps names to objects. ``get`` of an unknown name raises ``KeyError`` whose
    message lists every valid name."""

    def __init__(self, what: str):
        self.what = what
        self._items: dict[str, T] = {}

    def register(self, name: str, obj: T | None = None, *, override: bool = False):
        """``registry.register("name", obj)`` or use as ``@registry.register("name")``."""

        def _add(o: T) -> T:
            if name in self._items and not override:
                raise ValueError(f"{self.what} {name!r} is already registered; pass override=True to replace it")
            self._items[name] = o
            return o

        if obj is not None:
            return _add(obj)
        return _add

    def unregister(self, name: str) -> T:
        return self._items.pop(name)

    def get(self, name: str) -> T:
        try:
            return self._items[name]
        except KeyError:
            raise KeyError(f"unknown {self.what} {name!r}; valid: {', '.join(sorted(self._items))}") from None

    def __contains__(self, name: object) -> bool:
        return name in self._items

    def __iter__(self) -> Iterator[str]:
        return iter(self._items)

    def names(self) -> list[str]:
        return list(self._items)

    def items(self):
        return self._items.items()
