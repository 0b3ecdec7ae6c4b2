"""Routers: what applies an endpoint's traffic split. One interface (``Router``), chosen by
name with ``get_router``; the built-in router is the embedded default."""

from modelcd.routing.base import (
    Backend,
    EndpointRoute,
    Router,
    RoutingTable,
    WeightedChoice,
    endpoint_key,
    get_router,
)

__all__ = ["Backend", "EndpointRoute", "Router", "RoutingTable", "WeightedChoice", "endpoint_key", "get_router"]
