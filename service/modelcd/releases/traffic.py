"""Endpoint traffic: the split of each (model, environment) over its deployments, and the
routing table the router applies. The database is the source of truth; the router gets a
fresh, complete table after every committed change and must read it back."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from sqlalchemy import Connection, select, update

from modelcd.domain import Deployment, DeploymentState
from modelcd.errors import ModelcdError, NotFound, RouterError
from modelcd.releases.deployments import LIVE_STATES, Deployments, deployment_from_row, stop_deployment
from modelcd.releases.endpoint_keys import key_hashes
from modelcd.routing.base import Backend, EndpointRoute, Mirror, Router, RoutingTable
from modelcd.store import schema
from modelcd.store.db import Database, now
from modelcd.targets.base import Target

GENERATION_KEY = "router_generation"
SWAP = object()  # Traffic.switch's default: the split being replaced becomes the previous one

log = logging.getLogger(__name__)
T = TypeVar("T")


@dataclass(frozen=True)
class Endpoint:
    model: str
    environment: str
    traffic: dict[str, int]  # deployment id → weight
    previous_traffic: dict[str, int] | None
    auth: str  # key | none
    uri: str
    versions: dict[int, int]  # version → weight, for people
    updated_at: str
    retired_at: str | None = None  # retired (releases.retirement) until a release serves it again
    mirror: str | None = None  # the deployment shadow traffic is copied to, if any
    sample_rate: float = 0.0  # share of live requests the router keeps for the production watch

    def to_dict(self) -> dict[str, Any]:
        return {
            "model": self.model, "environment": self.environment, "uri": self.uri,
            "scoring_uri": f"{self.uri}/score",
            "traffic": {str(v): w for v, w in self.versions.items()}, "deployments": self.traffic,
            "previous_traffic": self.previous_traffic, "auth": self.auth, "updated_at": self.updated_at,
            "state": "retired" if self.retired_at else "active", "retired_at": self.retired_at,
            "mirror": self.mirror, "sample_rate": self.sample_rate,
        }


def endpoint_key(model: str, environment: str) -> str:
    return f"{model}/{environment}"


def build_table(conn: Connection, generation: int) -> RoutingTable:
    """The complete routing table from the committed state: every endpoint with its serving
    deployments (weight > 0) and its warm standbys (weight 0). A deployment that is no longer
    live is left out: its endpoint answers 503 rather than routing to a dead process."""
    live = [deployment_from_row(r) for r in conn.execute(
        select(schema.deployments).where(schema.deployments.c.state.in_(LIVE_STATES)))]
    routes: dict[str, EndpointRoute] = {}
    retired: dict[str, str] = {}
    keys = key_hashes(conn)
    for row in conn.execute(select(schema.endpoints)):
        m = row._mapping
        if m["retired_at"]:  # no route: the router answers 410 naming the retirement
            retired[endpoint_key(m["model"], m["environment"])] = m["retired_at"]
            continue
        traffic: dict[str, int] = dict(m["traffic"])
        backends = []
        for d in live:
            if (d.model, d.environment) != (m["model"], m["environment"]) or not d.url:
                continue
            if d.state is DeploymentState.READY and d.id not in traffic:
                continue  # under smoke test: reached on its own URI only
            backends.append(Backend(id=d.id, version=d.version, url=d.url, weight=int(traffic.get(d.id, 0)),
                                    **_asleep(d)))
        auth = m["auth"] or "none"  # endpoints made before keys existed stay open until a release sets auth
        routes[endpoint_key(m["model"], m["environment"])] = EndpointRoute(
            backends=tuple(backends), auth=auth,
            key_hashes=keys.get((m["model"], m["environment"]), ()) if auth == "key" else (),
            mirror=_mirror(m["mirror"], live), sample_rate=float(m["sample_rate"] or 0.0))
    return RoutingTable(generation=generation, endpoints=routes, retired=retired)


def _asleep(d: Deployment) -> dict[str, Any]:
    """A sleeping deployment's backend fields (``releases.idle``): the router holds its requests and wakes it."""
    if not d.sleeping:
        return {}
    return {"sleeping": True, "wake_timeout_s": float(d.sleeping.get("wake_timeout_s") or 10.0)}


def _mirror(spec: Mapping[str, Any] | None, live: Sequence[Deployment]) -> Mirror | None:
    """The router's mirror of an endpoint's stored shadow spec, while its candidate is live (a
    shadow candidate serves nobody; a mirrored canary step's also serves its share)."""
    if not spec:
        return None
    dep = next((d for d in live if d.id == spec.get("deployment_id") and d.url), None)
    if dep is None:
        return None
    return Mirror(id=dep.id, version=dep.version, url=dep.url or "", sample_rate=float(spec.get("sample_rate", 1.0)))


def retention_choice(deployments: Sequence[Deployment], traffic: Mapping[str, int],
                     previous: Mapping[str, int] | None, keep: int) -> list[Deployment]:
    """Which of an endpoint's ``deployments`` retire when it keeps ``keep``: only serving and
    standby ones are counted; one named by the current ``traffic`` or the ``previous`` split (what
    a rollback returns to) never retires; among the others the newest stay. Pure: ``retire``
    acts on it and a release plan shows it, so the two cannot disagree."""
    protected = set(traffic) | set(previous or {})
    live = [d for d in deployments if d.state in (DeploymentState.SERVING, DeploymentState.STANDBY)]
    others = sorted((d for d in live if d.id not in protected), key=lambda d: d.created_at, reverse=True)
    room = max(keep - sum(1 for d in live if d.id in protected), 0)
    return others[room:]


class Traffic:
    """Reads and changes endpoint traffic; keeps the router in step with the store."""

    def __init__(self, db: Database, router: Router, deployments: Deployments) -> None:
        self.db = db
        self.router = router
        self.deployments = deployments
        self._lock = threading.Lock()  # table builds and applies happen in generation order
        self._applied = 0  # the newest generation this process applied

    def get(self, model: str, environment: str) -> Endpoint:
        with self.db.read() as conn:
            row = conn.execute(select(schema.endpoints).where(
                schema.endpoints.c.model == model, schema.endpoints.c.environment == environment)).first()
            if row is None:
                raise NotFound(f"no endpoint for {model} in {environment}; nothing was promoted there yet",
                               field="environment")
            return self._endpoint(conn, row)

    def list(self, *, model: str | None = None, limit: int | None = None) -> list[Endpoint]:
        """Endpoints by model and environment (only ``model``'s; the first ``limit``)."""
        query = select(schema.endpoints).order_by(schema.endpoints.c.model, schema.endpoints.c.environment)
        if model is not None:
            query = query.where(schema.endpoints.c.model == model)
        if limit is not None:
            query = query.limit(limit)
        with self.db.read() as conn:
            return [self._endpoint(conn, r) for r in conn.execute(query)]

    def _endpoint(self, conn: Connection, row: Any) -> Endpoint:
        m = row._mapping
        traffic = dict(m["traffic"])
        versions: dict[int, int] = {}
        for dep_id, weight in traffic.items():
            r = conn.execute(select(schema.deployments.c.version).where(schema.deployments.c.id == dep_id)).first()
            if r is not None:
                versions[int(r[0])] = versions.get(int(r[0]), 0) + int(weight)
        return Endpoint(model=m["model"], environment=m["environment"], traffic=traffic,
                        previous_traffic=m["previous_traffic"], auth=m["auth"] or "none",
                        uri=self.router.endpoint_uri(m["model"], m["environment"]),
                        versions=versions, updated_at=m["updated_at"], retired_at=m["retired_at"],
                        mirror=(m["mirror"] or {}).get("deployment_id"), sample_rate=float(m["sample_rate"] or 0.0))

    def current(self, model: str, environment: str) -> dict[str, int]:
        try:
            return self.get(model, environment).traffic
        except NotFound:
            return {}

    def switch(self, model: str, environment: str, traffic: dict[str, int],
               log: Callable[[str], None] = lambda _: None, *, previous: dict[str, int] | object | None = SWAP,
               auth: str | None = None, also: Callable[[Connection], None] | None = None) -> int:
        """Give the endpoint its new split (see ``change``: applied and read back, or not
        committed). ``previous`` becomes the endpoint's ``previous_traffic`` (what rollback
        returns to): a release passes the split it found when it began; the default (a
        person's rollback) swaps, so rolling back twice returns. Serving deployments that
        lose all traffic go to standby. ``also`` writes more in the same transaction (an outbox
        event of the change). Returns the applied generation."""

        def mutate(conn: Connection) -> None:
            row = conn.execute(select(schema.endpoints).where(
                schema.endpoints.c.model == model, schema.endpoints.c.environment == environment)).first()
            old = dict(row._mapping["traffic"]) if row is not None else {}
            values: dict[str, Any] = {"traffic": traffic, "updated_at": now()}
            if previous is not SWAP:
                values["previous_traffic"] = previous
            elif old != traffic:
                values["previous_traffic"] = old or None
            if auth is not None:
                values["auth"] = auth
            if any(w > 0 for w in traffic.values()):
                values["retired_at"] = None  # a release serves a retired endpoint again
            if row is None:
                conn.execute(schema.endpoints.insert().values(
                    model=model, environment=environment, **{"auth": "key", **values}))
            else:
                conn.execute(schema.endpoints.update().where(
                    schema.endpoints.c.model == model, schema.endpoints.c.environment == environment)
                    .values(**values))
            for dep_id, weight in traffic.items():
                if weight > 0:
                    self.deployments.update(dep_id, conn, state=DeploymentState.SERVING)
            for dep_id in old:
                if traffic.get(dep_id, 0) == 0:
                    self.deployments.update(dep_id, conn, state=DeploymentState.STANDBY)
            if also is not None:
                also(conn)

        key = endpoint_key(model, environment)
        _, applied = self.change(f"traffic of {key}", mutate)
        log(f"router applied generation {applied}: {key} → {traffic}")
        return applied

    def set_mirror(self, model: str, environment: str, deployment_id: str | None, sample_rate: float = 1.0,
                   log: Callable[[str], None] = lambda _: None) -> int:
        """Start (``deployment_id``) or stop (None) copying the endpoint's live requests to a
        candidate deployment (shadow traffic; see ``change``: applied and read back, or not
        committed). Returns the applied generation."""
        spec = {"deployment_id": deployment_id, "sample_rate": sample_rate} if deployment_id else None

        def mutate(conn: Connection) -> None:
            done = conn.execute(schema.endpoints.update().where(
                schema.endpoints.c.model == model, schema.endpoints.c.environment == environment)
                .values(mirror=spec, updated_at=now()))
            if deployment_id and done.rowcount == 0:
                raise NotFound(f"no endpoint for {model} in {environment} to mirror", field="environment")

        key = endpoint_key(model, environment)
        _, applied = self.change(f"shadow traffic of {key}", mutate)
        log(f"router applied generation {applied}: " + (
            f"{key} copies {sample_rate:.0%} of its requests to {deployment_id}" if deployment_id
            else f"{key} copies nothing"))
        return applied

    def set_sampling(self, model: str, environment: str, rate: float,
                     log: Callable[[str], None] = lambda _: None) -> int:
        """Have the router keep ``rate`` of the endpoint's live requests with their answers (the
        production watch; 0 stops it). Applied and read back, or not committed (``change``)."""

        def mutate(conn: Connection) -> None:
            conn.execute(schema.endpoints.update().where(
                schema.endpoints.c.model == model, schema.endpoints.c.environment == environment)
                .values(sample_rate=rate or None, updated_at=now()))

        key = endpoint_key(model, environment)
        _, applied = self.change(f"sampling of {key}", mutate)
        log(f"router applied generation {applied}: {key} keeps {rate:.0%} of its requests for the watch" if rate
            else f"router applied generation {applied}: {key} keeps no requests")
        return applied

    def change(self, what: str, mutate: Callable[[Connection], T]) -> tuple[T, int]:
        """Run ``mutate`` in a write transaction, then apply the whole routing table it leaves
        to the router and read it back *before* the store commits: either both hold the
        change, or neither does and RouterError says ``what`` is unchanged. Returns what
        ``mutate`` returned and the applied generation."""
        with self._lock:
            generation = self._applied
            try:
                generation = self._allocate_generation()
                with self.db.write() as conn:
                    result = mutate(conn)
                    applied = self._apply(build_table(conn, generation))
            except Exception as e:
                self._restore_router(generation)
                reason = e.message if isinstance(e, ModelcdError) else f"{type(e).__name__}: {e}"
                raise RouterError(f"{what} unchanged ({reason}); the router serves what it served before") from e
            return result, applied

    def sync_router(self) -> int:
        """Apply the table from the store as it is (after a restart or a deployment change)."""
        with self._lock:
            generation = self._allocate_generation()
            with self.db.read() as conn:
                table = build_table(conn, generation)
            return self._apply(table)

    def _allocate_generation(self) -> int:
        """A generation newer than any this process applied (committed on its own, so one a
        failed switch used is never handed out again)."""
        with self.db.write() as conn:
            generation = self.db.next_counter(conn, GENERATION_KEY)
            if generation <= self._applied:
                generation = self._applied + 1
                conn.execute(update(schema.meta).where(schema.meta.c.key == GENERATION_KEY).values(value=generation))
        return generation

    def _apply(self, table: RoutingTable) -> int:
        applied = self.router.apply(table)
        self._applied = max(self._applied, applied)
        return applied

    def _restore_router(self, failed_generation: int) -> None:
        """After a failed switch, put the store's table back on the router in case it took the
        new one before the store refused it (best effort: reconcile retries)."""
        try:
            with self.db.read() as conn:
                self._apply(build_table(conn, max(failed_generation, self._applied) + 1))
        except Exception as e:  # the router may be down: reconcile applies the store's table later
            log.warning("could not put the stored routing table back: %s", e)

    def retire(self, model: str, environment: str, keep: int, target: Target, home: Path,
               log: Callable[[str], None] = lambda _: None) -> list[Deployment]:
        """Stop live deployments of the endpoint beyond ``keep``. A deployment named by the
        current or the previous traffic (what a rollback returns to) is never stopped; among
        the others the newest are kept. They leave the routing table before they stop."""
        try:
            endpoint = self.get(model, environment)
        except NotFound:
            return []
        live = self.deployments.list(model=model, environment=environment, live_only=True)
        retired = retention_choice(live, endpoint.traffic, endpoint.previous_traffic, keep)
        if not retired:
            return []
        with self.db.write() as conn:
            for d in retired:
                self.deployments.update(d.id, conn, state=DeploymentState.STOPPED)
        self.sync_router()
        for d in retired:
            log(f"retiring deployment {d.id} (v{d.version}, pid {d.pid}): beyond keep_deployments={keep}")
            stop_deployment(target, d, home, log)
        return retired
