"""Reconcile on start (and periodically): the data plane must match what the store says.

Deployments that should be serving (or kept warm) are re-adopted by what was recorded
(pid, port, health); only when one is gone is it started again from its bundle. The
router gets the stored table only when the live one differs, so a restart of the control
plane changes nothing that was serving."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass, field

from modelcd.context import Context
from modelcd.domain import DeploymentState
from modelcd.errors import ModelcdError
from modelcd.releases.deployments import deploy_spec, handle_of, runner_started
from modelcd.releases.idle import stop_leftover
from modelcd.releases.traffic import build_table

log = logging.getLogger(__name__)


@dataclass
class ReconcileReport:
    adopted: list[str] = field(default_factory=list)
    restarted: list[str] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)
    router_synced: bool = False


def reconcile(ctx: Context, say: Callable[[str], None] = log.info) -> ReconcileReport:
    """Adopt or restart serving/standby deployments, then bring the router in line."""
    report = ReconcileReport()
    ctx.router.ensure_running()
    changed = False
    for d in ctx.deployments.list(live_only=True):
        if d.state not in (DeploymentState.SERVING, DeploymentState.STANDBY):
            continue  # READY ones belong to an in-flight release, which resumes them
        if d.sleeping:  # scaled to zero (releases.idle): stopped on purpose; a request wakes it
            stop_leftover(ctx, d)
            continue
        if runner_started(d):
            continue  # its runner started it where this service may not reach; the router's health checks watch it
        target = ctx.target(d.target)
        if target.adopt(d) is not None:
            report.adopted.append(d.id)
            continue
        say(f"deployment {d.id} ({d.model} v{d.version}, pid {d.pid}) is gone; starting it again")
        try:
            rd = target.create(deploy_spec(d, ctx.settings), say, threading.Event())
        except ModelcdError as e:
            say(f"could not restart deployment {d.id}: {e.message}")
            target.delete(handle_of(d, ctx.home))
            ctx.deployments.update(d.id, state=DeploymentState.FAILED)
            report.failed.append(d.id)
            changed = True
            continue
        if ctx.deployments.get(d.id).state not in (DeploymentState.SERVING, DeploymentState.STANDBY):
            # stopped while it was being started again (a release rolled back, an endpoint retired:
            # they record the stop before the process ends): the new process goes too
            say(f"deployment {d.id} was stopped meanwhile; stopping the process just started")
            target.delete(rd)
            continue
        ctx.deployments.update(d.id, url=rd.url, pid=rd.pid, port=rd.port, log_path=str(rd.log_path))
        report.restarted.append(d.id)
        changed = True
    if changed or not _router_matches(ctx):
        ctx.traffic.sync_router()
        report.router_synced = True
    return report


def _router_matches(ctx: Context) -> bool:
    try:
        live = ctx.router.read()
    except ModelcdError:
        return False
    with ctx.db.read() as conn:
        stored = build_table(conn, live.generation)
    return stored.to_dict() == live.to_dict()
