"""One registry mechanism for everything Tango builds by name: losses, models, data sets and
mixing strategies (as timm's ``register_model`` / ``list_models``).

    from dml.registry import Registry
    LOSSES = Registry("loss")

    @LOSSES.register("contrastive")
    class ContrastiveLoss(...): ...

    LOSSES.names()          # ['contrastive', ...], registration order
    LOSSES["contrastive"]   # the class; an unknown name raises, listing the valid ones
    LOSSES.get("contrastive-loss")   # also through an alias (registered with aliases=...)

A registry is a read-only mapping from canonical names to entries; ``register`` refuses an empty
or duplicate name. Each family exports ``list_<family>()`` (``dml.losses.list_losses``,
``dml.models.list_models``, ``dml.data.list_datasets``, ``dml.mixing.list_mixings``).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Generic, Iterator, TypeVar

T = TypeVar("T")


class Registry(Mapping, Generic[T]):
    """Entries by canonical name, plus aliases; ``error`` is the exception raised for an unknown
    name (a ValueError subclass; data sets use DatasetError)."""

    def __init__(self, kind: str, error: type[ValueError] = ValueError):
        self.kind, self.error = kind, error
        self._entries: dict[str, T] = {}
        self._aliases: dict[str, str] = {}

    def register(self, name: str, entry: T | None = None, *, aliases: tuple[str, ...] = ()):
        """Register ``entry`` under ``name`` (and ``aliases``); without ``entry``, a decorator."""
        def add(obj: T) -> T:
            key = str(name).strip().lower()
            if not key or key in self._entries or key in self._aliases:
                raise ValueError(f"{self.kind} name {name!r} is empty or already registered")
            self._entries[key] = obj
            for a in aliases:
                a = str(a).strip().lower()
                if a in self._entries or a in self._aliases:
                    raise ValueError(f"{self.kind} alias {a!r} is already registered")
                self._aliases[a] = key
            return obj

        return add if entry is None else add(entry)

    def canonical(self, name: str) -> str:
        """The registered name for ``name`` or one of its aliases (case and spaces ignored)."""
        key = str(name).strip().lower()
        key = self._aliases.get(key, key)
        if key not in self._entries:
            raise self.error(f"unknown {self.kind} {name!r}; valid names: {', '.join(self._entries)}")
        return key

    def names(self) -> list[str]:
        return list(self._entries)

    def __getitem__(self, name: str) -> T:
        return self._entries[self.canonical(name)]

    def get(self, name: str, default=None):
        try:
            return self[name]
        except ValueError:
            return default

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and self.get(name) is not None

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)

    def __repr__(self) -> str:
        return f"Registry({self.kind}: {', '.join(self._entries)})"

