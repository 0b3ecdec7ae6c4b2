"""Ports chosen by name: the one registry shape of every outside system (targets, routers,
sources, artifact stores, builders, pipeline providers).

Each port keeps its ``Ports`` next to its interface (``TARGETS`` in ``targets``, ``ROUTERS``
in ``routing.base``...). A registry maps a name to a factory, either a callable or a lazy
``"module:attr"`` string imported the first time that name is chosen, so an adapter's heavy
imports (boto3, cryptography, the docker SDK...) happen only when it is used. All factories
of one port take the same arguments. An unknown name raises the port's error listing the
known names.

Standard library and ``modelcd.errors`` only.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from importlib import import_module
from typing import Generic, ParamSpec, TypeVar

from modelcd.errors import ConfigError, ModelcdError

P = ParamSpec("P")
T = TypeVar("T")


class Ports(Generic[P, T]):
    """Name → factory of one port's implementations, e.g. ``Ports[[Settings], Target]``.

    ``unknown`` is the message for an unknown name, a ``str.format`` template with ``{name}``
    (the name asked for) and ``{known}`` (the known names, comma-separated, in the order they
    are declared here); it is raised as ``error`` with ``field``."""

    def __init__(self, factories: Mapping[str, Callable[P, T] | str], *, unknown: str, field: str,
                 error: type[ModelcdError] = ConfigError) -> None:
        for name, factory in factories.items():
            if isinstance(factory, str) and not _is_lazy_ref(factory):
                raise ValueError(f"port {name!r}: lazy factory {factory!r} must be 'module:attr'")
        self._factories: dict[str, Callable[P, T] | str] = dict(factories)
        self.unknown = unknown
        self.field = field
        self.error = error

    def __contains__(self, name: object) -> bool:
        return name in self._factories

    def __iter__(self) -> Iterator[str]:
        return iter(self._factories)

    def __len__(self) -> int:
        return len(self._factories)

    def names(self) -> list[str]:
        """The known names, in declaration order."""
        return list(self._factories)

    def factory(self, name: str) -> Callable[P, T]:
        """The factory called ``name`` (importing a lazy one now); the port's error listing
        the known names when there is none."""
        factory = self._factories.get(name)
        if factory is None:
            message = self.unknown.format(name=name, known=", ".join(self._factories))
            raise self.error(message, field=self.field)
        if isinstance(factory, str):
            module, _, attr = factory.partition(":")
            resolved: Callable[P, T] = getattr(import_module(module), attr)
            return resolved
        return factory

    def create(self, name: str, *args: P.args, **kwargs: P.kwargs) -> T:
        """The implementation called ``name``, made by its factory with these arguments."""
        return self.factory(name)(*args, **kwargs)


def _is_lazy_ref(ref: str) -> bool:
    module, sep, attr = ref.partition(":")
    return bool(sep and module and attr.isidentifier())
