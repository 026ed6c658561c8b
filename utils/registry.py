"""Registry: name -> class, for the things a user adds by writing one class (architectures, optimizers,
schedules, tokenizers). A config value names an entry; an unknown name is a one-line error that lists
the registered names and the closest one.

    ARCHITECTURES = Registry("arch")
    @ARCHITECTURES.register("mine")
    class MyBlock(Block): ...
    ARCHITECTURES.lookup(cfg.arch)
"""

from __future__ import annotations

import difflib
from typing import Callable, Generic, TypeVar

T = TypeVar("T")


class Registry(Generic[T]):
    """Named entries of one kind; `key` is the config key that picks one."""

    def __init__(self, key: str) -> None:
        self.key = key
        self._entries: dict[str, T] = {}

    def register(self, name: str) -> Callable[[T], T]:
        """Decorator: add the class (or function) under name; a name is taken once."""
        def add(entry: T) -> T:
            if name in self._entries and self._entries[name] is not entry:
                raise ValueError(f"{self.key} '{name}' is already registered ({self._entries[name]!r})")
            self._entries[name] = entry
            return entry
        return add

    def lookup(self, name: str) -> T:
        if name not in self._entries:
            match = difflib.get_close_matches(name, list(self._entries), n=1, cutoff=0.6)
            hint = f" (did you mean '{match[0]}'?)" if match else ""
            raise ValueError(f"{self.key}: '{name}' is not registered{hint}; choose one of {', '.join(self._entries)}")
        return self._entries[name]

    def names(self) -> list[str]:
        return list(self._entries)

    def __contains__(self, name: object) -> bool:
        return name in self._entries
