"""Routers: what applies an endpoint's traffic split. One interface (``Router``, in
``routing.base``), chosen by name with ``routing.base.get_router``; the built-in router is
the embedded default. This package's own names are the table's values only, so the router
process (``routing.proxy``) imports nothing of the control plane."""

from modelcd.routing.table import Backend, EndpointRoute, RoutingTable, WeightedChoice, endpoint_key

__all__ = ["Backend", "EndpointRoute", "RoutingTable", "WeightedChoice", "endpoint_key"]
