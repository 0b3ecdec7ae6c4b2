"""Scale to zero: a policy environment's ``idle: {scale_to_zero_after_s: N}`` puts a deployment
that got no request for N seconds to sleep, and the router wakes it on the next request.

- **Sleep** (``IdleSleeper.tick``, on the release runner's loop): the router says how long each
  backend has been idle (``Router.idle_seconds``). A serving deployment idle for N seconds, and
  the standby a rollback returns to only with ``idle.standby: sleep``, is recorded ``sleeping``
  (``{since, wake_timeout_s}``) and its route marked sleeping in the same applied change
  (``Traffic.change``), then its process is stopped. Its route keeps its version, URL and
  weight. Endpoints with a release in flight or shadow traffic are left alone.
- **Wake** (``wake_steps``, called by the router through the loopback route ``POST
  /-/wake/<id>`` with the secret of ``home/router/wake.json``; ``app.wake`` streams its steps):
  once no sleep is stopping it any more the router hears "starting" and may poll its health;
  the deployment is started again from its spec on its own port (a warm start on the process
  target), and once healthy the record and the table say it is awake.

A sleeping deployment is neither adopted nor restarted by reconcile, and a restart of the
service leaves it asleep and wakeable (the table is built from the record)."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import secrets
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from modelcd.context import Context
from modelcd.domain import Deployment, DeploymentState
from modelcd.errors import Conflict, DeployError, ModelcdError
from modelcd.releases.deployments import deploy_spec, handle_of, runner_started, stop_deployment
from modelcd.releases.machine import Phase
from modelcd.releases.policy import Idle, IdleStandby
from modelcd.routing.base import Router
from modelcd.store.db import now

log = logging.getLogger(__name__)

WAKE_ROUTE = "/-/wake"
_locks: dict[str, threading.Lock] = {}  # per deployment: one sleep or wake at a time
_locks_guard = threading.Lock()


def _lock(dep_id: str) -> threading.Lock:
    with _locks_guard:
        return _locks.setdefault(dep_id, threading.Lock())


# -- the router's way back to us --------------------------------------------------------------


def write_wake_file(router: Router, host: str, port: int) -> str | None:
    """Tell the router where to ask for wakes and with which secret (``router.wake_file()``,
    mode 0600; the secret is kept across restarts). Returns the secret (None: this router
    cannot hold requests, so nothing sleeps)."""
    path = router.wake_file()
    if path is None:
        return None
    secret = wake_secret(path) or secrets.token_urlsafe(32)
    host = "127.0.0.1" if host in ("", "0.0.0.0") else ("::1" if host == "::" else host)
    url = f"http://{f'[{host}]' if ':' in host else host}:{port}{WAKE_ROUTE}"
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump({"url": url, "secret": secret}, f)
    os.replace(tmp, path)
    return secret


def wake_secret(path: Path | None) -> str | None:
    """The secret of the wake file at ``path``, if there is one."""
    if path is None:
        return None
    try:
        value = json.loads(path.read_text()).get("secret")
    except (OSError, ValueError, AttributeError):
        return None
    return value if isinstance(value, str) and value else None


# -- sleep --------------------------------------------------------------------------------------


class IdleSleeper:
    """Puts idle deployments to sleep (see the module docstring); ``tick`` every ``every_s``."""

    def __init__(self, ctx: Context, every_s: float = 0.5) -> None:
        self.ctx = ctx
        self.every_s = every_s
        self._next = 0.0
        self._idle_of: dict[str, Idle | None] = {}  # release id → its environment's idle (a snapshot: fixed)
        self._router_down = False
        # sleeps stop processes (SIGTERM, a grace period): off the runner's loop, a few at a time
        self._pool = ThreadPoolExecutor(2, thread_name_prefix="idle")
        self._sleeping: set[str] = set()  # deployment ids being put to sleep
        self._guard = threading.Lock()

    def tick(self) -> None:
        if time.monotonic() < self._next or self.ctx.router.wake_file() is None:
            return
        self._next = time.monotonic() + self.every_s
        due = self._candidates()
        if not due:
            return
        try:
            idle_s = self.ctx.router.idle_seconds()
        except ModelcdError as e:  # the supervisor restarts it; nothing sleeps meanwhile
            if not self._router_down:
                log.warning("idle deployments stay awake while the router does not answer: %s", e.message)
            self._router_down = True
            return
        self._router_down = False
        for d, idle in due:
            idle_for = idle_s.get(d.id)
            if idle_for is not None and idle_for >= idle.scale_to_zero_after_s:
                with self._guard:
                    if d.id in self._sleeping:
                        continue
                    self._sleeping.add(d.id)
                self._pool.submit(self._sleep, d, idle, idle_for)

    def _sleep(self, d: Deployment, idle: Idle, idle_for: float) -> None:
        try:
            idle_for = self.ctx.router.idle_seconds().get(d.id, 0.0)  # a request may have come meanwhile
            if idle_for >= idle.scale_to_zero_after_s:
                put_to_sleep(self.ctx, d, idle, idle_for)
        except Exception:
            log.exception("putting deployment %s to sleep", d.id)
        finally:
            with self._guard:
                self._sleeping.discard(d.id)

    def _candidates(self) -> list[tuple[Deployment, Idle]]:
        """Awake deployments whose endpoint's policy lets them sleep, with that policy's ``idle``."""
        ctx = self.ctx
        busy = {(r.model, r.environment) for r in ctx.releases.in_phases({p for p in Phase if p.active})}
        by_endpoint: dict[tuple[str, str], list[Deployment]] = {}
        for d in ctx.deployments.list(live_only=True):
            by_endpoint.setdefault((d.model, d.environment), []).append(d)
        out: list[tuple[Deployment, Idle]] = []
        known, self._idle_of = self._idle_of, {}  # kept for the releases that serve now, no others
        for ep in ctx.traffic.list():
            if ep.retired_at or ep.mirror or (ep.model, ep.environment) in busy:
                continue
            live = {d.id: d for d in by_endpoint.get((ep.model, ep.environment), [])}
            serving = live.get(max(ep.traffic.items(), key=lambda kv: kv[1], default=("", 0))[0])
            if serving is None or not serving.release_id:
                continue
            rid = serving.release_id
            idle = self._idle_of[rid] = known[rid] if rid in known else release_idle(ctx, rid)
            if idle is None:
                continue
            for d in live.values():
                if d.sleeping or runner_started(d) or d.state not in (DeploymentState.SERVING, DeploymentState.STANDBY):
                    continue
                if d.state is DeploymentState.SERVING or idle.standby is IdleStandby.SLEEP:
                    out.append((d, idle))
        return out


def release_idle(ctx: Context, release_id: str) -> Idle | None:
    """The ``idle`` of the policy environment a release ran under (what released the serving deployment)."""
    try:
        return ctx.releases.get(release_id).environment_policy.idle
    except Exception:  # a release row from an older policy format: leave it awake
        log.debug("no policy for release %s", release_id, exc_info=True)
        return None


def put_to_sleep(ctx: Context, d: Deployment, idle: Idle, idle_for: float) -> bool:
    """Record ``d`` sleeping and mark its route so (one applied change), then stop its process."""
    with _lock(d.id):
        d = ctx.deployments.get(d.id)
        if d.sleeping or not d.state.live:
            return False
        sleeping = {"since": now(), "wake_timeout_s": idle.wake_timeout_s}
        ctx.traffic.change(f"sleep of deployment {d.id}",
                           lambda conn: ctx.deployments.update(d.id, conn, sleeping=sleeping, pid=None))
        stop_deployment(ctx.target(d.target), d, ctx.home, log.info)
    ctx.jobs.event(None, d.release_id, "deployment.slept",
                   f"deployment {d.id} ({d.model} v{d.version}, {d.state}) scaled to zero after {idle_for:.1f}s "
                   f"without a request (idle.scale_to_zero_after_s {idle.scale_to_zero_after_s}); the next request "
                   "wakes it")
    log.info("deployment %s (%s v%s) is asleep", d.id, d.model, d.version)
    return True


def stop_leftover(ctx: Context, d: Deployment) -> None:
    """A sleeping deployment whose process outlived its sleep (the service died between
    recording the sleep and stopping it): stop it now, unless a wake is under way."""
    lock = _lock(d.id)
    if not lock.acquire(blocking=False):
        return
    try:
        d = ctx.deployments.get(d.id)
        if d.sleeping:  # not woken meanwhile
            ctx.target(d.target).delete(handle_of(d, ctx.home))
    except ModelcdError as e:
        log.warning("could not stop what is left of sleeping deployment %s: %s", d.id, e.message)
    finally:
        lock.release()


# -- wake ---------------------------------------------------------------------------------------


def wake_steps(ctx: Context, dep_id: str, timeout_s: float) -> Iterator[dict[str, Any]]:
    """Wake the sleeping deployment ``dep_id``, step by step. The first step comes once nothing
    else sleeps or wakes it (a sleep in progress has stopped its process): ``{"phase":
    "starting"}``, or ``{"phase": "awake", "woke": false}`` for one that is not asleep (the
    end). Then it starts again from its spec (on its own port when free) and, once healthy,
    is recorded awake and the table that routes to it applied: ``{"phase": "awake", "woke":
    true, ...}``. Conflict before the first step when it cannot wake; DeployError after it
    when it does not start within ``timeout_s`` (it stays asleep)."""
    started = time.monotonic()
    lock = _lock(dep_id)
    if not lock.acquire(timeout=timeout_s):
        raise Conflict(f"deployment {dep_id} is being put to sleep or woken; retry", field="deployment_id")
    try:
        d = ctx.deployments.get(dep_id)
        if not d.sleeping:
            yield {"phase": "awake", "deployment_id": dep_id, "woke": False, "state": str(d.state)}
            return
        if not d.state.live:
            raise Conflict(f"deployment {dep_id} is {d.state}: only a serving or standby deployment wakes",
                           field="deployment_id")
        yield {"phase": "starting", "deployment_id": dep_id, "port": d.port}
        target = ctx.target(d.target)
        spec = dataclasses.replace(deploy_spec(d, ctx.settings), health_timeout_s=timeout_s, port=d.port)
        starting = time.monotonic()
        try:
            rd = target.create(spec, log.info, threading.Event())
        except DeployError as e:
            ctx.jobs.event(None, d.release_id, "deployment.wake_failed",
                           f"deployment {d.id} ({d.model} v{d.version}) could not wake: {e.message}")
            raise
        healthy = time.monotonic()
        try:
            ctx.traffic.change(f"wake of deployment {d.id}", lambda conn: ctx.deployments.update(
                d.id, conn, url=rd.url, pid=rd.pid, port=rd.port, log_path=str(rd.log_path), sleeping=None))
        except BaseException:
            with contextlib.suppress(Exception):
                target.delete(handle_of(dataclasses.replace(d, pid=rd.pid), ctx.home))
            raise
    finally:
        lock.release()
    done = time.monotonic()
    took = {"total": done - started, "start_to_healthy": healthy - starting, "table": done - healthy}
    ctx.jobs.event(None, d.release_id, "deployment.woke", (
        f"deployment {d.id} ({d.model} v{d.version}) woke on a request in {took['total'] * 1000:.0f} ms at {rd.url} "
        f"(start → healthy {took['start_to_healthy'] * 1000:.0f} ms, routing table {took['table'] * 1000:.0f} ms)"))
    yield {"phase": "awake", "deployment_id": dep_id, "woke": True, "state": str(d.state), "url": rd.url,
           "took_s": {k: round(v, 4) for k, v in took.items()}}
