"""The one registry shape of the ports (``modelcd.ports.Ports``), with literal factories and
a real module written for the lazy case."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from modelcd.errors import ConfigError, NotFound
from modelcd.ports import Ports


def _ports() -> Ports[[int], str]:
    return Ports({"b": lambda n: f"b{n}", "a": lambda n: f"a{n}"},
                 unknown="unknown thing {name!r}; known things: {known}", field="thing")


def test_create_calls_the_named_factory_with_the_arguments() -> None:
    ports = _ports()
    assert ports.create("a", 1) == "a1" and ports.create("b", 2) == "b2"
    assert "a" in ports and "c" not in ports
    assert list(ports) == ports.names() == ["b", "a"] and len(ports) == 2


def test_unknown_name_lists_the_known_ones_in_the_ports_error() -> None:
    with pytest.raises(ConfigError) as e:
        _ports().create("c", 1)
    assert e.value.message == "unknown thing 'c'; known things: b, a"
    assert e.value.field == "thing"
    other = Ports({"x": str}, unknown="no {name}, only {known}", field="source", error=NotFound)
    with pytest.raises(NotFound, match="no y, only x") as found:
        other.factory("y")
    assert found.value.field == "source" and found.value.http_status == 404


@pytest.fixture
def lazy_module(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """A real module on sys.path that no one has imported yet."""
    name = "modelcd_ports_lazy_adapter"
    (tmp_path / f"{name}.py").write_text("def make(n: int) -> str:\n    return f'lazy{n}'\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    yield name
    sys.modules.pop(name, None)


def test_lazy_factory_is_imported_only_when_chosen(lazy_module: str) -> None:
    ports: Ports[[int], str] = Ports({"eager": lambda n: f"eager{n}", "lazy": f"{lazy_module}:make"},
                                     unknown="unknown {name}; known: {known}", field="thing")
    assert ports.create("eager", 1) == "eager1"
    with pytest.raises(ConfigError, match="known: eager, lazy"):
        ports.create("other", 1)
    assert lazy_module not in sys.modules
    assert ports.create("lazy", 2) == "lazy2"
    assert lazy_module in sys.modules


def test_a_lazy_factory_must_name_module_and_attribute() -> None:
    with pytest.raises(ValueError, match="'module:attr'"):
        Ports({"x": "modelcd.targets"}, unknown="{name} {known}", field="x")


def test_every_port_uses_the_one_shape() -> None:
    from modelcd.builders import BUILDERS
    from modelcd.pipelines.providers import PROVIDERS
    from modelcd.registry.artifacts import ARTIFACT_STORES
    from modelcd.routing.base import ROUTERS
    from modelcd.sources.base import KNOWN_SOURCES
    from modelcd.targets import TARGETS

    for ports in (BUILDERS, PROVIDERS, ARTIFACT_STORES, ROUTERS, KNOWN_SOURCES, TARGETS):
        assert isinstance(ports, Ports) and len(ports) >= 1
