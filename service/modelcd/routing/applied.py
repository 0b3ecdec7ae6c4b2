"""The table as the router process serves it: each endpoint a ``Route`` (its weighted
choice and access rule), each backend a ``Target`` (its pool and precomputed header bytes),
the whole an immutable ``AppliedTable`` that a request reads once."""

from __future__ import annotations

from typing import TYPE_CHECKING
from urllib.parse import urlsplit

from modelcd.routing.table import Backend, EndpointRoute, RoutingTable, WeightedChoice

if TYPE_CHECKING:
    from modelcd.routing.mirror import MirrorState, SampleState
    from modelcd.routing.upstream import UpstreamPool


class Target:
    """A backend of the applied table, with its connection pool and precomputed headers."""

    __slots__ = ("backend", "host_line", "marks", "pool", "prefix")

    def __init__(self, backend: Backend, pool: UpstreamPool) -> None:
        parts = urlsplit(backend.url)
        self.backend = backend
        self.pool = pool
        self.prefix = parts.path.rstrip("/").encode()
        self.host_line = b"host: " + parts.netloc.encode() + b"\r\n"  # for clients that sent no Host
        self.marks = b"x-modelcd-version: %d\r\nx-modelcd-deployment: %s\r\n" % (
            backend.version, backend.id.encode())


class Route:
    """One endpoint of the applied table: its backends, the weighted choice among them, and
    what a request needs to be let through."""

    __slots__ = ("choice", "digests", "key", "keyed", "mirror", "name", "sampler", "targets", "weights")

    def __init__(self, key: bytes, route: EndpointRoute, targets: list[Target],
                 mirror: MirrorState | None = None, sampler: SampleState | None = None) -> None:
        self.key = key  # b"model/env"
        self.name = key.decode("latin-1")  # the same, for messages
        self.targets = targets
        self.weights = [b.weight for b in route.backends]
        self.choice = WeightedChoice(targets, self.weights)
        self.keyed = route.auth == "key"
        self.digests = tuple(bytes.fromhex(h) for h in route.key_hashes)
        self.mirror = mirror  # shadow traffic: the candidate copies go to (None: no copies)
        self.sampler = sampler  # the production watch: sampled requests with their answers (None: none)


class AppliedTable:
    """One applied table: the table itself and its routes keyed by b"model/env"."""

    __slots__ = ("routes", "table")

    def __init__(self, table: RoutingTable, routes: dict[bytes, Route]) -> None:
        self.table = table
        self.routes = routes
