"""The one registry helper, and the one check of a closed choice.

Compression methods (compress.methods), export backends (export.registry) and runtimes
(runtime_tests.runtimes) are each a `Registry`: a name -> entry table filled by the modules
that define the entries. Modules listed as `lazy` are imported on the first lookup of their
name, so naming every entry imports no heavy library. An unknown name is a one-line
ValueError listing the known ones, never a KeyError or a None called later. Torch-free, so
export.registry can use it without importing torch.
"""

from __future__ import annotations

import importlib
from typing import Generic, Iterator, TypeVar

T = TypeVar("T")


class Registry(Generic[T]):
    def __init__(self, kind: str, lazy: dict[str, str] | None = None):
        self.kind = kind  # what an entry is called in messages: "method", "backend", "runtime"
        self.lazy = dict(lazy or {})  # name -> module that registers it when imported
        self.entries: dict[str, T] = {}

    def add(self, name: str, entry: T) -> T:
        self.entries[name] = entry
        return entry

    def known(self) -> list[str]:
        """The lazy names in their listed order, then the others sorted."""
        return list(self.lazy) + sorted(set(self.entries) - set(self.lazy))

    def get(self, name: str) -> T:
        if name not in self.entries and name in self.lazy:
            importlib.import_module(self.lazy[name])
        if name not in self.entries:
            raise ValueError(f"unknown {self.kind} {name!r}; known {self.kind}s: {', '.join(self.known())}")
        return self.entries[name]

    def __contains__(self, name: str) -> bool:
        return name in self.entries or name in self.lazy

    def __iter__(self) -> Iterator[tuple[str, T]]:
        """(name, entry) of every registered entry (lazy modules not imported)."""
        return iter(sorted(self.entries.items()))


def enum_choice(enum: type, value, what: str):
    """`enum(value)`, or a one-line ValueError naming the choices."""
    try:
        return enum(value)
    except ValueError:
        raise ValueError(f"unknown {what} {value!r}; choose one of {', '.join(e.value for e in enum)}") from None
