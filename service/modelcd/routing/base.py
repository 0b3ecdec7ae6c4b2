"""The ``Router`` port and the routing table it applies.

A router is the data plane's front door: it holds, for each endpoint (``model/env``), the
deployments (backends) that serve it and their traffic weights, and sends every scoring
request to one of them. The control plane decides the table; a router applies it, and
reports back what it is really serving (read from the live router, never from a record the
control plane keeps), so a promotion is recorded only after the split is verified.

The table's values live in ``routing.table`` (standard library only: the router process
imports that module, not this one) and are re-exported here.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from modelcd.errors import RouterError
from modelcd.ports import Ports
from modelcd.routing.table import (
    Backend,
    EndpointRoute,
    Mirror,
    RoutingTable,
    WeightedChoice,
    endpoint_key,
    listen_is_loopback,
    next_candidate,
)

if TYPE_CHECKING:
    from modelcd.config import Settings


class Router(ABC):
    """Applies routing tables to a live router and reads back what it serves.

    Every method blocks until done and raises ``modelcd.errors.RouterError`` for an
    expected failure (router down, port taken, table rejected, verification failed); the
    message says what to do. Methods are safe to call from several threads.
    """

    name: ClassVar[str]

    @abstractmethod
    def ensure_running(self) -> None:
        """Make sure the router serves, then return. Idempotent: adopts a router that is
        already running for the same table (after a control-plane restart) instead of
        starting a second one; never starts two on one port. Raises RouterError when it
        cannot start, or when something else holds the port."""

    @abstractmethod
    def apply(self, table: RoutingTable) -> int:
        """Make ``table`` the live table, atomically (each request sees the old or the new
        table, never a mix), and return its generation once the live router was read back
        and serves exactly that table. Idempotent for a table equal to the live one.
        Raises RouterError when the router is down, rejects the table, reads back something
        else, or when ``table.generation`` is older than the live one (a stale writer); a
        failed apply leaves the previously applied table serving."""

    @abstractmethod
    def read(self) -> RoutingTable:
        """The table the live router serves now (asked from it, not from a file or a
        record). Raises RouterError when the router does not answer."""

    @abstractmethod
    def endpoint_uri(self, model: str, env: str) -> str:
        """The stable URI of an endpoint, e.g. ``http://127.0.0.1:8700/iris/production``;
        scoring is that plus ``/score``. Pure: does not contact the router."""

    @abstractmethod
    def stop(self) -> None:
        """Stop the router this instance runs or adopted, waiting for in-flight requests
        (bounded). Idempotent: stopping a stopped router does nothing."""

    def mirror_pairs(self, model: str, env: str, after: int = 0, limit: int = 1000) -> dict[str, Any]:
        """Shadow traffic of an endpoint that mirrors (its route's ``mirror``): the candidate's
        counters (``mirrored``, ``dropped``, ``candidate_errors``, ``seq``…) and ``pairs`` after
        sequence number ``after``, oldest first: ``{seq, ts, request, champion: {status, body,
        ms}, candidate: {status, body, ms, error}, truncated}``. Raises RouterError when the
        router does not answer or the endpoint mirrors nothing."""
        raise RouterError(f"router {self.name} does not keep shadow traffic")

    def samples(self, model: str, env: str, after: int = 0, limit: int = 1000) -> dict[str, Any]:
        """The production watch: an endpoint's sampled live requests (its route's
        ``sample_rate``) with the answers they got: ``{seq, ts, request, answer: {status, body,
        ms}, truncated}`` after ``after``, oldest first, with the counters. Raises RouterError
        when the router does not answer or the endpoint samples nothing."""
        raise RouterError(f"router {self.name} does not sample traffic")

    def idle_seconds(self) -> dict[str, float]:
        """Scale to zero: seconds since the router last sent a request to each backend (deployment
        id) of its table, or since it first routed to it. Raises RouterError when the router does
        not answer or does not tell."""
        raise RouterError(f"router {self.name} does not report idle backends")

    def wake_file(self) -> Path | None:
        """Where the control plane tells this router how to ask for a wake (``routing.wake``);
        None: the router cannot hold requests for a sleeping backend, so nothing sleeps."""
        return None

    def supervise(self) -> bool:
        """Called periodically by the control plane: repair the router if it died (restart
        it with the last applied table). Returns True when it repaired something. Never
        raises for a router that is healthy; raises RouterError when a repair fails."""
        return False


# name -> factory of a Router from the settings (imported when chosen).
ROUTERS: Ports[[Settings], Router] = Ports(
    {"builtin": "modelcd.routing.builtin:from_settings"},
    unknown="unknown router {name!r}; known routers: {known}", field="router")


def get_router(name: str, settings: Settings) -> Router:
    """The router called ``name`` (see ``ROUTERS``), configured from ``settings``; raise
    ConfigError listing the known names for an unknown one."""
    return ROUTERS.create(name, settings)


__all__ = ["ROUTERS", "Backend", "EndpointRoute", "Mirror", "Router", "RoutingTable", "WeightedChoice", "endpoint_key",
           "get_router", "listen_is_loopback", "next_candidate"]
