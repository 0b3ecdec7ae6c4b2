"""Pure tests of the routing table values and the weighted choice (no processes)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from modelcd.config import Settings, load_settings
from modelcd.errors import ConfigError, InvalidInput
from modelcd.routing.base import get_router
from modelcd.routing.builtin import BuiltinRouter
from modelcd.routing.client import key_accepted
from modelcd.routing.table import (
    Backend,
    EndpointRoute,
    RoutingTable,
    WeightedChoice,
    listen_is_loopback,
    next_candidate,
)

H1 = hashlib.sha256(b"k1").hexdigest()
H2 = hashlib.sha256(b"k2").hexdigest()


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


def test_get_router_lists_known_names(tmp_path: Path) -> None:
    settings = Settings(home=tmp_path, router_host="127.0.0.2", router_port=8123, router_allow_open_endpoints=True,
                        router_mirror_worker_priority="low")
    with pytest.raises(ConfigError, match="unknown router 'nginx'; known routers: builtin") as e:
        get_router("nginx", settings)
    assert e.value.field == "router"
    router = get_router("builtin", settings)  # configured from the settings; nothing is started
    assert isinstance(router, BuiltinRouter)
    assert (router.host, router.port, router.allow_open_endpoints) == ("127.0.0.2", 8123, True)
    assert router.mirror_worker_priority == "low"
    with pytest.raises(ConfigError, match="MODELCD_ROUTER_MIRROR_WORKER_PRIORITY.*'idle', 'low' or 'normal'"):
        load_settings(environ={"MODELCD_HOME": str(tmp_path), "MODELCD_ROUTER_MIRROR_WORKER_PRIORITY": "lowest"})
    assert router.table_path == tmp_path.resolve() / "router" / "table.json"


# -- keyed endpoints ------------------------------------------------------------------------
def _keyed_dict(**route: object) -> dict[str, object]:
    data = _table_dict()
    data["endpoints"]["iris/production"].update(route)  # type: ignore[index]
    return data


def test_auth_round_trips_and_defaults_to_none() -> None:
    b = Backend("d1", 1, "http://127.0.0.1:9000", 100)
    keyed = RoutingTable(2, {"iris/production": EndpointRoute((b,), auth="key", key_hashes=(H1, H2))})
    assert RoutingTable.from_json(keyed.to_json()) == keyed
    assert json.loads(keyed.to_json())["endpoints"]["iris/production"] | {"backends": []} == {
        "backends": [], "auth": "key", "key_hashes": [H1, H2]}
    old = RoutingTable.from_dict(_table_dict())  # a table written before keyed endpoints
    route = old.route("iris", "production")
    assert route is not None and (route.auth, route.key_hashes) == ("none", ())
    assert EndpointRoute((b,)) == EndpointRoute((b,), "none", ())
    assert EndpointRoute((b,), auth="key").key_hashes == ()  # keyed without keys: refuses everything


@pytest.mark.parametrize(("route", "says"), [
    ({"auth": "token"}, ".auth"), ({"auth": None}, ".auth"), ({"auth": "KEY"}, ".auth"),
    ({"auth": "key", "key_hashes": [H1.upper()]}, ".key_hashes"),
    ({"auth": "key", "key_hashes": [H1[:63]]}, ".key_hashes"),
    ({"auth": "key", "key_hashes": ["my-secret-key"]}, ".key_hashes"),
    ({"auth": "key", "key_hashes": H1}, ".key_hashes"),
    ({"auth": "key", "key_hashes": [H1] * 5}, ".key_hashes"),
    ({"auth": "none", "key_hashes": [H1]}, ".key_hashes"),
    ({"auth": "key", "keys": ["k1"]}, "unknown field"),
])
def test_rejects_bad_auth_values(route: dict[str, object], says: str) -> None:
    with pytest.raises(InvalidInput, match="invalid routing table") as e:
        RoutingTable.from_dict(_keyed_dict(**route))
    assert says in e.value.message and "endpoints['iris/production']" in e.value.message
    assert e.value.field is not None and e.value.field.startswith("endpoints['iris/production']")
    assert "my-secret-key" not in e.value.message  # something pasted as a digest may be a key


def test_endpoint_route_validates_auth() -> None:
    b = Backend("d1", 1, "http://127.0.0.1:9000", 100)
    with pytest.raises(InvalidInput, match="auth") as e:
        EndpointRoute((b,), auth="basic")
    assert e.value.field == "route.auth"
    with pytest.raises(InvalidInput, match="key_hashes"):
        EndpointRoute((b,), auth="key", key_hashes=("x" * 64,))


def test_key_accepted_needs_exact_bearer_key() -> None:
    digests = (bytes.fromhex(H1), bytes.fromhex(H2))
    assert key_accepted(b"Bearer k1", digests) and key_accepted(b"Bearer k2", digests)
    for value in (None, b"", b"k1", b"Bearer", b"Bearer ", b"bearer k1", b"Bearer  k1", b"Bearer k1 ",
                  b"Bearer k1\t", b"Basic k1", b"Bearer k3", b" Bearer k1"):
        assert not key_accepted(value, digests), value
    assert not key_accepted(b"Bearer k1", ())  # keyed with no keys: nothing is accepted
    key = "clé-ü".encode()
    assert key_accepted(b"Bearer " + key, (hashlib.sha256(key).digest(),))


# -- non-loopback safety ---------------------------------------------------------------------
@pytest.mark.parametrize(("host", "loopback"), [
    ("127.0.0.1", True), ("127.1.2.3", True), ("::1", True), ("[::1]", True), ("localhost", True),
    ("LOCALHOST", True), ("::ffff:127.0.0.1", True),
    ("0.0.0.0", False), ("::", False), ("", False), ("192.168.1.20", False), ("10.0.0.1", False),
    ("fe80::1%eth0", False), ("example.com", False), ("localhost.example.com", False), ("128.0.0.1", False),
])
def test_listen_is_loopback(host: str, loopback: bool) -> None:
    assert listen_is_loopback(host) is loopback


# -- failover order --------------------------------------------------------------------------
def test_next_candidate_prefers_weighted_then_standby_then_down() -> None:
    items, weights = ["a", "b", "standby"], [70, 30, 0]
    assert [next_candidate(items, weights, [], [], r) for r in (0.0, 0.69, 0.7, 0.99)] == ["a", "a", "b", "b"]
    assert {next_candidate(items, weights, ["a"], [], i / 10) for i in range(10)} == {"b"}
    assert next_candidate(items, weights, ["a", "b"], [], 0.5) == "standby"
    assert next_candidate(items, weights, [], ["a"], 0.1) == "b"  # a marked down: skipped
    assert next_candidate(items, weights, [], ["a", "b"], 0.1) == "standby"
    assert next_candidate(items, weights, ["standby"], ["a", "b"], 0.1) == "a"  # a mark may be stale
    assert next_candidate(items, weights, ["a", "b", "standby"], [], 0.5) is None


def test_next_candidate_spreads_over_standbys_and_ignores_zero_weight_when_weighted_left() -> None:
    items, weights = ["a", "s1", "s2"], [100, 0, 0]
    assert {next_candidate(items, weights, [], [], i / 10) for i in range(10)} == {"a"}
    assert {next_candidate(items, weights, ["a"], [], i / 10) for i in range(10)} == {"s1", "s2"}
    assert next_candidate(items, weights, ["a"], ["s1"], 0.0) == "s2"
