"""Old import paths of gptlab 0.1, kept for one release so that plugins written against them
keep loading (with a DeprecationWarning naming the new path). Removed in gptlab 0.3."""

from __future__ import annotations

import importlib
import warnings


def moved(old_module: str, table: dict[str, str]):
    """A module ``__getattr__`` serving ``table``'s names (name -> new module) from their new
    home, with a DeprecationWarning."""

    def __getattr__(name):
        if name not in table:
            raise AttributeError(f"module {old_module!r} has no attribute {name!r}")
        warnings.warn(f"{old_module}.{name} moved to {table[name]}.{name}; import it from there "
                      f"(the old path goes in gptlab 0.3)", DeprecationWarning, stacklevel=2)
        return getattr(importlib.import_module(table[name]), name)

    return __getattr__
