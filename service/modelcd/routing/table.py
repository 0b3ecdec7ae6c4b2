"""The routing table and the choices made on it: endpoints (``model/env``), their backends
with traffic weights and who may call them, validated whole (``RoutingTable.from_dict`` lists
every problem at once), plus the pure picks the router makes per request (``WeightedChoice``,
``next_candidate``).

Standard library and ``modelcd.errors`` only: the router process imports it (the control
plane's ``Router`` port is in ``routing.base``).
"""

from __future__ import annotations

import ipaddress
import json
import re
from bisect import bisect_right
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

from modelcd.errors import InvalidInput

# One path segment of an endpoint key: a model name or an environment name as the registry
# allows them. It can never start with '-', so the router's admin prefix "/-/" is free.
SEGMENT_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
BACKEND_URL_RE = re.compile(r"http://(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9.-]+)(:\d{1,5})?(/[^\s?#]*)?")
ID_RE = re.compile(r"[!-~]{1,128}")  # it goes into a response header: printable ASCII, no spaces
MAX_WEIGHT = 1_000_000
AUTH_MODES = ("none", "key")  # "key": the router answers 401 unless the request bears a valid key
KEY_HASH_RE = re.compile(r"[0-9a-f]{64}")  # lowercase hex sha256 of a key's UTF-8 bytes
MAX_KEYS = 4  # valid keys per endpoint: enough to rotate without a gap, few enough to try them all

T = TypeVar("T")


def endpoint_key(model: str, env: str) -> str:
    """The table key of the endpoint of ``model`` in ``env``: ``"model/env"``."""
    return f"{model}/{env}"


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _backend_problems(where: str, id: object, version: object, url: object, weight: object) -> list[str]:
    """Every reason these values cannot make a ``Backend``; ``where`` prefixes each."""
    problems: list[str] = []
    if not isinstance(id, str) or not ID_RE.fullmatch(id):
        problems.append(f"{where}.id: must be 1-128 printable ASCII characters without spaces (got {id!r})")
    if not _is_int(version) or version < 0:  # type: ignore[operator]
        problems.append(f"{where}.version: must be an integer >= 0 (got {version!r})")
    if not isinstance(url, str) or not BACKEND_URL_RE.fullmatch(url):
        problems.append(f"{where}.url: must be an http:// URL like http://127.0.0.1:8000 (got {url!r})")
    if not _is_int(weight) or not 0 <= weight <= MAX_WEIGHT:  # type: ignore[operator]
        problems.append(f"{where}.weight: must be an integer from 0 to {MAX_WEIGHT} (got {weight!r})")
    return problems


def _route_problems(where: str, backends: Sequence[Backend]) -> list[str]:
    ids = [b.id for b in backends]
    dupes = sorted({i for i in ids if ids.count(i) > 1})
    return [f"{where}.backends: duplicate backend id(s) {', '.join(dupes)}"] if dupes else []


def _auth_problems(where: str, auth: object, key_hashes: object) -> list[str]:
    """Every reason these values cannot be an endpoint's ``auth`` and ``key_hashes``."""
    problems: list[str] = []
    if auth not in AUTH_MODES or not isinstance(auth, str):
        problems.append(f"{where}.auth: must be one of {', '.join(map(repr, AUTH_MODES))} (got {auth!r})")
    if not isinstance(key_hashes, list | tuple):
        return [*problems, f"{where}.key_hashes: must be a list of sha256 hex digests (got {key_hashes!r})"]
    if len(key_hashes) > MAX_KEYS:
        problems.append(f"{where}.key_hashes: at most {MAX_KEYS} keys per endpoint (got {len(key_hashes)})")
    bad = [h for h in key_hashes if not isinstance(h, str) or not KEY_HASH_RE.fullmatch(h)]
    if bad:  # a digest is not a secret, but a malformed one could be a key pasted by mistake: don't echo it
        problems.append(f"{where}.key_hashes: {len(bad)} item(s) are not lowercase hex sha256 digests (64 of 0-9a-f)")
    if auth == "none" and key_hashes:
        problems.append(f"{where}.key_hashes: must be empty when auth is 'none' (set auth to 'key' to use them)")
    return problems


def _key_problems(key: object) -> list[str]:
    parts = key.split("/") if isinstance(key, str) else []
    if len(parts) != 2 or not all(SEGMENT_RE.fullmatch(p) for p in parts):
        return [f"endpoints: key {key!r} must be 'model/env' (letters, digits, '.', '_', '-'; no leading '-')"]
    return []


def _raise(problems: list[str]) -> None:
    if problems:
        field_name = problems[0].split(":", 1)[0]
        raise InvalidInput("invalid routing table: " + "; ".join(problems), field=field_name)


@dataclass(frozen=True)
class Backend:
    """One deployment behind an endpoint. ``weight`` is its share of the endpoint's traffic
    relative to the other backends; 0 means warm standby: listed, healthy, but sent nothing."""

    id: str  # deployment id, echoed to clients as X-Modelcd-Deployment
    version: int  # model version, echoed to clients as X-Modelcd-Version
    url: str  # base URL of the deployment; the request's path after model/env is appended
    weight: int
    # scaled to zero: its process is stopped; a request is held while the control plane wakes it
    # (routing.wake), at most ``wake_timeout_s``, then answered 503 with Retry-After
    sleeping: bool = False
    wake_timeout_s: float = 10.0

    def __post_init__(self) -> None:
        _raise(_backend_problems("backend", self.id, self.version, self.url, self.weight)
               + _sleep_problems("backend", self.sleeping, self.wake_timeout_s))

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"id": self.id, "version": self.version, "url": self.url, "weight": self.weight}
        if self.sleeping:  # only then: a table without sleepers reads as before
            out.update(sleeping=True, wake_timeout_s=self.wake_timeout_s)
        return out


def _sleep_problems(where: str, sleeping: object, wake_timeout_s: object) -> list[str]:
    problems = [] if isinstance(sleeping, bool) else [f"{where}.sleeping: must be true or false (got {sleeping!r})"]
    if isinstance(wake_timeout_s, bool) or not isinstance(wake_timeout_s, int | float) \
            or not 0 < wake_timeout_s <= 3600:
        problems.append(f"{where}.wake_timeout_s: must be a number of seconds above 0, at most 3600 "
                        f"(got {wake_timeout_s!r})")
    return problems


@dataclass(frozen=True)
class Mirror:
    """A candidate the router copies live requests to (shadow traffic). ``sample_rate`` of the
    endpoint's requests (0 < rate <= 1) answered by another backend are copied once answered;
    the pairs of answers are kept for the control plane's analysis. A shadow candidate is not a
    backend (it never answers a client); a mirrored canary step's is (with its weight), and the
    requests it answers itself are not copied."""

    id: str  # the candidate deployment's id
    version: int
    url: str
    sample_rate: float = 1.0

    def __post_init__(self) -> None:
        _raise(_mirror_problems("mirror", self.id, self.version, self.url, self.sample_rate))

    def to_dict(self) -> dict[str, Any]:
        return {"id": self.id, "version": self.version, "url": self.url, "sample_rate": self.sample_rate}


def _mirror_problems(where: str, id: object, version: object, url: object, rate: object) -> list[str]:
    return _backend_problems(where, id, version, url, 0) + _rate_problems(f"{where}.sample_rate", rate)


def _rate_problems(where: str, rate: object, zero: bool = False) -> list[str]:
    if isinstance(rate, bool) or not isinstance(rate, int | float) or not (0 <= rate <= 1 if zero else 0 < rate <= 1):
        return [f"{where}: must be a number {'from 0' if zero else 'above 0 and'} to 1 (got {rate!r})"]
    return []


@dataclass(frozen=True)
class EndpointRoute:
    """The backends of one endpoint and who may call it. Backend ids are unique within it.

    ``auth`` is "none" (anyone who reaches the router) or "key": then a scoring request must
    carry ``Authorization: Bearer <key>`` with ``sha256(key.encode()).hexdigest()`` in
    ``key_hashes`` (at most ``MAX_KEYS``; none means every request is refused). The router
    holds digests only, never keys."""

    backends: tuple[Backend, ...]
    auth: str = "none"
    key_hashes: tuple[str, ...] = ()
    mirror: Mirror | None = None  # shadow traffic: a candidate that gets copies, never clients
    sample_rate: float = 0.0  # the production watch: share of requests kept with their answers (0: none)

    def __post_init__(self) -> None:
        object.__setattr__(self, "backends", tuple(self.backends))
        if isinstance(self.key_hashes, list):
            object.__setattr__(self, "key_hashes", tuple(self.key_hashes))
        _raise(_route_problems("route", self.backends) + _auth_problems("route", self.auth, self.key_hashes)
               + _rate_problems("route.sample_rate", self.sample_rate, zero=True))

    @property
    def total_weight(self) -> int:
        return sum(b.weight for b in self.backends)

    def split(self) -> dict[str, int]:
        """Weight by backend id, e.g. ``{"d12": 90, "d13": 10}``."""
        return {b.id: b.weight for b in self.backends}

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"backends": [b.to_dict() for b in self.backends], "auth": self.auth,
                               "key_hashes": list(self.key_hashes)}
        if self.mirror is not None:
            out["mirror"] = self.mirror.to_dict()
        if self.sample_rate:
            out["sample_rate"] = self.sample_rate
        return out


@dataclass(frozen=True)
class RoutingTable:
    """Everything a router serves, stamped with a generation that only grows: the control
    plane writes generation N+1 to change anything, and a router reports the generation it
    has applied, so "is my change live?" is one integer comparison plus a content check."""

    generation: int
    endpoints: dict[str, EndpointRoute] = field(default_factory=dict)
    # endpoints retired on purpose ('model/env' → when, ISO-8601): no route; the router answers 410 naming it
    retired: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        problems = [] if _is_int(self.generation) and self.generation >= 0 else [
            f"generation: must be an integer >= 0 (got {self.generation!r})"]
        for key in self.endpoints:
            problems += _key_problems(key)
        _raise(problems + _retired_problems(self.retired, self.endpoints))

    def route(self, model: str, env: str) -> EndpointRoute | None:
        """The route of one endpoint, or None when the table does not have it."""
        return self.endpoints.get(endpoint_key(model, env))

    def with_route(self, model: str, env: str, route: EndpointRoute | None) -> RoutingTable:
        """A copy with one endpoint set (or removed when ``route`` is None), generation + 1."""
        endpoints = dict(self.endpoints)
        if route is None:
            endpoints.pop(endpoint_key(model, env), None)
        else:
            endpoints[endpoint_key(model, env)] = route
        retired = {k: v for k, v in self.retired.items() if k not in endpoints}
        return RoutingTable(self.generation + 1, endpoints, retired)

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"generation": self.generation,
                               "endpoints": {k: r.to_dict() for k, r in sorted(self.endpoints.items())}}
        if self.retired:  # only when there is one: a table without any reads as before
            out["retired"] = dict(sorted(self.retired.items()))
        return out

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=1, sort_keys=True)

    @classmethod
    def from_dict(cls, data: object) -> RoutingTable:
        """Validate a decoded table; raise InvalidInput listing every problem at once."""
        if not isinstance(data, Mapping):
            raise InvalidInput("invalid routing table: must be a JSON object", field="table")
        problems: list[str] = []
        generation = data.get("generation")
        if not _is_int(generation) or generation < 0:  # type: ignore[operator]
            problems.append(f"generation: must be an integer >= 0 (got {generation!r})")
        extra = sorted(set(data) - {"generation", "endpoints", "retired"})
        if extra:
            problems.append(f"table: unknown field(s) {', '.join(map(str, extra))}")
        raw_endpoints = data.get("endpoints")
        if not isinstance(raw_endpoints, Mapping):
            problems.append("endpoints: must be an object of 'model/env': {backends: [...]}")
            raw_endpoints = {}
        endpoints: dict[str, EndpointRoute] = {}
        for key, raw in raw_endpoints.items():
            route, route_problems = _parse_route(key, raw)
            problems += _key_problems(key) + route_problems
            if route is not None:
                endpoints[key] = route
        retired = data.get("retired", {})
        if not isinstance(retired, Mapping):
            problems.append("retired: must be an object of 'model/env': when it was retired")
            retired = {}
        _raise(problems + _retired_problems(retired, endpoints))
        return cls(generation, endpoints, dict(retired))  # type: ignore[arg-type]

    @classmethod
    def from_json(cls, text: str | bytes) -> RoutingTable:
        """Parse and validate a table written by ``to_json``; raise InvalidInput if bad."""
        try:
            data = json.loads(text)
        except (ValueError, UnicodeDecodeError) as e:
            raise InvalidInput(f"invalid routing table: not JSON ({e})", field="table") from e
        return cls.from_dict(data)


def _retired_problems(retired: Mapping[Any, Any], endpoints: Collection[str]) -> list[str]:
    """Every reason ``retired`` cannot be a table's retired endpoints."""
    problems: list[str] = []
    for key, when in retired.items():
        problems += [p.replace("endpoints:", "retired:", 1) for p in _key_problems(key)]
        if not isinstance(when, str) or not 0 < len(when) <= 40 or not when.isprintable():
            problems.append(f"retired[{key!r}]: must be when it was retired, an ISO-8601 text (got {when!r})")
        if key in endpoints:
            problems.append(f"retired[{key!r}]: a retired endpoint has no route; remove it from endpoints")
    return problems


ROUTE_FIELDS = frozenset({"backends", "auth", "key_hashes", "mirror", "sample_rate"})
MIRROR_FIELDS = frozenset({"id", "version", "url", "sample_rate"})
BACKEND_FIELDS = frozenset({"id", "version", "url", "weight", "sleeping", "wake_timeout_s"})


def _parse_route(key: object, raw: object) -> tuple[EndpointRoute | None, list[str]]:
    where = f"endpoints[{key!r}]"
    raw = raw if isinstance(raw, Mapping) else {}
    items = raw.get("backends")
    if not isinstance(items, list):
        return None, [f"{where}.backends: must be a list of {{id, version, url, weight}}"]
    # Tables written before keyed endpoints have neither field: they mean an open endpoint.
    auth, key_hashes = raw.get("auth", "none"), raw.get("key_hashes", [])
    extra = sorted(map(str, set(raw) - ROUTE_FIELDS))
    problems = [f"{where}: unknown field(s) {', '.join(extra)}"] if extra else []
    problems += _auth_problems(where, auth, key_hashes)
    backends: list[Backend] = []
    for i, item in enumerate(items):
        at = f"{where}.backends[{i}]"
        if not isinstance(item, Mapping):
            problems.append(f"{at}: must be an object {{id, version, url, weight}}")
            continue
        values = [item.get(k) for k in ("id", "version", "url", "weight")]
        extra = sorted(set(item) - BACKEND_FIELDS)
        if extra:
            problems.append(f"{at}: unknown field(s) {', '.join(map(str, extra))}")
        sleep = [item.get("sleeping", False), item.get("wake_timeout_s", 10.0)]
        found = _backend_problems(at, *values) + _sleep_problems(at, *sleep)
        problems += found
        if not found:
            backends.append(Backend(*values, *sleep))  # type: ignore[arg-type]
    problems += _route_problems(where, backends)
    mirror, raw_mirror = None, raw.get("mirror")
    if raw_mirror is not None:
        if not isinstance(raw_mirror, Mapping):
            problems.append(f"{where}.mirror: must be an object {{id, version, url, sample_rate}}")
        else:
            extra = sorted(map(str, set(raw_mirror) - MIRROR_FIELDS))
            if extra:
                problems.append(f"{where}.mirror: unknown field(s) {', '.join(extra)}")
            values = [raw_mirror.get(k) for k in ("id", "version", "url")] + [raw_mirror.get("sample_rate", 1.0)]
            found = _mirror_problems(f"{where}.mirror", *values)
            problems += found
            if not found:
                mirror = Mirror(*values)  # type: ignore[arg-type]
    sample_rate = raw.get("sample_rate", 0.0)
    problems += _rate_problems(f"{where}.sample_rate", sample_rate, zero=True)
    return (None if problems else EndpointRoute(tuple(backends), auth, tuple(key_hashes), mirror,
                                                float(sample_rate))), problems


class WeightedChoice(Generic[T]):
    """Pick one of several items in proportion to integer weights; items of weight 0 are
    never picked. ``r`` is a uniform number in [0, 1) supplied by the caller, which keeps
    this pure (tests pass literal values, the router passes ``random.random()``)."""

    __slots__ = ("_cum", "_items", "_total", "_weights")

    def __init__(self, items: Sequence[T], weights: Sequence[int]) -> None:
        self._items = [i for i, w in zip(items, weights, strict=True) if w > 0]
        self._weights = [w for w in weights if w > 0]
        self._cum: list[int] = []
        total = 0
        for w in self._weights:
            total += w
            self._cum.append(total)
        self._total = total

    def __bool__(self) -> bool:
        return self._total > 0

    def pick(self, r: float) -> T | None:
        """The item whose cumulative-weight interval holds ``r * total``; None if all are 0."""
        if not self._total:
            return None
        return self._items[min(bisect_right(self._cum, r * self._total), len(self._items) - 1)]


def next_candidate(items: Sequence[T], weights: Sequence[int], tried: Collection[T], down: Collection[T],
                   r: float) -> T | None:
    """Where a request goes next (first try or failover) among an endpoint's backends.

    In order: a weighted pick among the weighted items (weight > 0) neither tried nor down;
    then a standby (weight 0) neither tried nor down, picked evenly; then the same two among
    the down items (a mark may be stale, and trying beats answering 502 unasked). None once
    every item was tried. ``r`` is uniform in [0, 1), as for ``WeightedChoice``."""
    fresh = [(i, w) for i, w in zip(items, weights, strict=True) if i not in tried]
    for usable in ([p for p in fresh if p[0] not in down], [p for p in fresh if p[0] in down]):
        weighted = [p for p in usable if p[1] > 0]
        pool = weighted or [(i, 1) for i, _ in usable]
        if pool:
            return WeightedChoice([i for i, _ in pool], [w for _, w in pool]).pick(r)
    return None


def listen_is_loopback(host: str) -> bool:
    """Whether a router listening on ``host`` is reachable from this machine only:
    127.0.0.0/8, ::1 and "localhost" are; every other name or address ("", 0.0.0.0, ::, a
    LAN address) is not."""
    if host.lower() == "localhost":
        return True
    try:
        ip = ipaddress.ip_address(host.strip("[]").split("%", 1)[0])
    except ValueError:
        return False  # a name other than localhost may resolve anywhere
    mapped = getattr(ip, "ipv4_mapped", None)
    return ip.is_loopback or (mapped is not None and mapped.is_loopback)
