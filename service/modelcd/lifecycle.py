"""Stopping the data plane on purpose (``modelcd shutdown``, the end of the quickstart).
The control plane never does this by itself: deployments outlive it by design."""

from __future__ import annotations

from collections.abc import Iterator

from modelcd.config import Settings
from modelcd.context import build_context
from modelcd.domain import DeploymentState
from modelcd.releases.deployments import handle_of
from modelcd.targets.warm import WarmStarts


def stop_data_plane(settings: Settings) -> Iterator[str]:
    """Stop every live deployment recorded in this home, then the router and the process
    target's warm-start parents."""
    ctx = build_context(settings)
    try:
        for d in ctx.deployments.list(live_only=True):
            ctx.target(d.target).delete(handle_of(d, ctx.home))
            ctx.deployments.update(d.id, state=DeploymentState.STOPPED)
            yield f"stopped deployment {d.id} ({d.model} v{d.version}, pid {d.pid})"
        ctx.router.stop()
        yield f"stopped router on {settings.router_url}"
        for pid in WarmStarts(ctx.home).stop_all():
            yield f"stopped warm-start parent process {pid}"
    finally:
        ctx.db.dispose()
