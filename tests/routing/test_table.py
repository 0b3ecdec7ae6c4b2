"""Pure tests of the routing table values and the weighted choice (no processes)."""

from __future__ import annotations

import json

import pytest

from modelcd.errors import ConfigError, InvalidInput
from modelcd.routing import Backend, EndpointRoute, RoutingTable, WeightedChoice, get_router


def _table_dict(**backend: object) -> dict[str, object]:
    b = {"id": "d1", "version": 1, "url": "http://127.0.0.1:9000", "weight": 100} | backend
    return {"generation": 3, "endpoints": {"iris/production": {"backends": [b]}}}


def test_round_trip_through_json() -> None:
    t = RoutingTable(7, {"iris/production": EndpointRoute((
        Backend("d12", 3, "http://127.0.0.1:41234", 90), Backend("d13", 4, "http://127.0.0.1:41235/p", 10)))})
    assert RoutingTable.from_json(t.to_json()) == t
    assert json.loads(t.to_json())["endpoints"]["iris/production"]["backends"][0]["id"] == "d12"
    route = t.route("iris", "production")
    assert route is not None and route.split() == {"d12": 90, "d13": 10}
    assert t.route("iris", "staging") is None


@pytest.mark.parametrize(("field", "value", "says"), [
    ("weight", -1, "weight"), ("weight", 1.5, "weight"), ("weight", True, "weight"), ("weight", "10", "weight"),
    ("url", "https://x:1", "url"), ("url", "127.0.0.1:9000", "url"), ("url", "http://h:1?q=1", "url"),
    ("version", -2, "version"), ("id", "", "id"), ("id", "a b", "id"), ("id", "d\r\nx:y", "id"), ("id", "dé", "id"),
])
def test_rejects_bad_backend_values(field: str, value: object, says: str) -> None:
    with pytest.raises(InvalidInput, match=says) as e:
        RoutingTable.from_dict(_table_dict(**{field: value}))
    assert "backends[0]" in e.value.message


def test_lists_every_problem_at_once() -> None:
    data = _table_dict(weight=-1, url="ftp://x")
    data["generation"] = -5
    data["endpoints"]["bad key"] = {"backends": []}  # type: ignore[index]
    with pytest.raises(InvalidInput) as e:
        RoutingTable.from_dict(data)
    for part in ("generation", "weight", "url", "'bad key'"):
        assert part in e.value.message


@pytest.mark.parametrize("text", [
    "not json", "[]", '{"generation": 1}', '{"generation": 1, "endpoint": {}}',
    '{"generation": 1, "endpoints": {"iris/production": {"backends": {}}}}',
    '{"generation": 1, "endpoints": {"-/x": {"backends": []}}}',
])
def test_rejects_malformed_tables(text: str) -> None:
    with pytest.raises(InvalidInput, match="invalid routing table"):
        RoutingTable.from_json(text)


def test_rejects_duplicate_backend_ids() -> None:
    with pytest.raises(InvalidInput, match="duplicate"):
        EndpointRoute((Backend("d", 1, "http://a:1", 1), Backend("d", 2, "http://b:1", 1)))


def test_constructors_validate() -> None:
    with pytest.raises(InvalidInput):
        Backend("d", 1, "http://a:1", -3)
    with pytest.raises(InvalidInput):
        RoutingTable(-1, {})
    with pytest.raises(InvalidInput):
        RoutingTable(1, {"no-slash": EndpointRoute(())})


def test_with_route_bumps_generation() -> None:
    t = RoutingTable(4, {})
    route = EndpointRoute((Backend("d", 1, "http://a:1", 100),))
    t2 = t.with_route("iris", "production", route)
    assert (t2.generation, t2.route("iris", "production")) == (5, route)
    assert t2.with_route("iris", "production", None) == RoutingTable(6, {})
    assert t.endpoints == {}


def test_weighted_choice_follows_cumulative_weights() -> None:
    c = WeightedChoice(["a", "b"], [90, 10])
    assert [c.pick(r) for r in (0.0, 0.5, 0.8999, 0.9, 0.9999)] == ["a", "a", "a", "b", "b"]


def test_weighted_choice_skips_zero_weights() -> None:
    c = WeightedChoice(["standby", "live", "off"], [0, 5, 0])
    assert {c.pick(i / 100) for i in range(100)} == {"live"}
    assert WeightedChoice(["x"], [0]).pick(0.3) is None
    assert not WeightedChoice(["x", "y"], [0, 0])


def test_weighted_choice_pick_other_excludes_one() -> None:
    c = WeightedChoice(["a", "b", "c"], [50, 0, 50])
    assert {c.pick_other(i / 10, "a") for i in range(10)} == {"c"}
    assert WeightedChoice(["a", "b"], [1, 0]).pick_other(0.5, "a") is None


def test_get_router_lists_known_names() -> None:
    with pytest.raises(ConfigError, match="known routers: builtin"):
        get_router("nginx")
    with pytest.raises(ConfigError, match="bad options"):
        get_router("builtin", nonsense=1)
