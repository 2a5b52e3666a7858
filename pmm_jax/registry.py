"""Named entries of one extension axis (pseudo-mask variants, CAM methods, ...), and the
``config.plugins`` modules that add entries from outside the package.

An axis owns one :class:`Registry`; its module registers the built-in entries at import,
and a researcher's module registers more the same way::

    from pmm_jax.masks.variants import VARIANTS, Variant
    VARIANTS.register("my_variant", Variant(...))

and names that module in the config: ``--config.plugins=my_package.my_module`` (several:
comma-separated). ``pmm_jax.main`` imports them (:func:`import_plugins`) before the config
rules run, so the rules, the stages and the records see the new names exactly as the
built-in ones. This module imports only the standard library: CPU workers may use it.
"""

from __future__ import annotations

import importlib
from typing import Callable, Generic, Iterator, TypeVar

T = TypeVar("T")


class UnknownNameError(ValueError):
    """A name no entry of the registry has; the message lists the registered names."""


class Registry(Generic[T]):
    """Entries of one axis by name, in registration order.

    Args:
        axis: what the entries are, for messages ("pseudo-mask variant").
    """

    def __init__(self, axis: str):
        self.axis = axis
        self._entries: dict[str, T] = {}

    def register(self, name: str, entry: T | None = None, *, replace: bool = False):
        """Adds ``entry`` under ``name`` and returns it; without ``entry``, a decorator that
        registers what it decorates. A name already taken by another entry is a ValueError
        unless ``replace`` (registering the same object again is a no-op)."""
        if entry is None:
            return lambda obj: self.register(name, obj, replace=replace)
        if not isinstance(name, str) or not name or "," in name or name != name.strip():
            raise ValueError(f"{self.axis} name {name!r} must be a non-empty string without "
                             "commas or surrounding spaces")
        if name in self._entries and self._entries[name] is not entry and not replace:
            raise ValueError(f"{self.axis} {name!r} is already registered; choose another "
                             "name (or pass replace=True)")
        self._entries[name] = entry
        return entry

    def get(self, name: str) -> T:
        """The entry of ``name``; :class:`UnknownNameError` listing the registered names."""
        try:
            return self._entries[name]
        except (KeyError, TypeError):
            raise UnknownNameError(f"unknown {self.axis} {name!r}; registered: "
                                   f"{self.listing()}") from None

    def names(self) -> tuple[str, ...]:
        """The registered names, in registration order."""
        return tuple(self._entries)

    def listing(self) -> str:
        """The registered names as a message shows them: ``'a', 'b'``."""
        return ", ".join(map(repr, self._entries))

    def check(self, value) -> str | None:
        """A config rule (``config_rules`` style): None when ``value`` is a registered name,
        else what it must be, listing the names as registered at the time of the check."""
        return None if value in self._entries else (
            f"is not a registered {self.axis} (registered: {self.listing()})")

    def __contains__(self, name) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)

    def items(self):
        return self._entries.items()


def plugin_modules(spec: str) -> list[str]:
    """The module names of a ``config.plugins`` value: comma-separated, blanks ignored."""
    if not isinstance(spec, str):
        raise ValueError(f"config.plugins={spec!r} must be a comma-separated string of "
                         "module names")
    return [name.strip() for name in spec.split(",") if name.strip()]


def import_plugins(spec: str, importer: Callable[[str], object] = importlib.import_module
                   ) -> list[str]:
    """Imports every module of ``spec`` (``config.plugins``), which registers its entries;
    returns their names. A module that cannot be imported is a ValueError naming it and the
    key (its own error included), so the command line shows one paragraph."""
    names = plugin_modules(spec)
    for name in names:
        try:
            importer(name)
        except Exception as err:  # noqa: BLE001 - any failure of a user's module
            raise ValueError(
                f"config.plugins: cannot import module {name!r} ({type(err).__name__}: {err}); "
                "it must be importable from the working directory or the Python path "
                "(PYTHONPATH)") from err
    return names
