"""Watching production: after a release whose policy environment has ``watch``, the router keeps
a share of the endpoint's live requests with their answers (``Traffic.set_sampling``, off the
request path) and this watcher judges them over a sliding window of ``window_s``:

- inputs against the serving version's training statistics (``max_input_psi``, per feature);
- outputs against the first full window after the release (``max_prediction_psi``): what the
  model answered when it was new is its reference.

A breach is an event on the serving release (``watch.breach``), a Prometheus series (the
``watch_status`` table, read by ``/metrics``), a signed notification to each of
``notify_urls`` (``X-Modelcd-Signature: t=…,v1=…`` as ``/hooks/generic`` checks it, see
``modelcd.sources.generic.sign``), and with ``on_breach: rollback`` traffic returns to the
previous version (the same swap as ``modelcd rollback``). A breach is reported once; the watch
reports again only after a window within the limits.

``ProductionWatch.tick`` runs on the release runner's loop (``LocalRunner(also=...)``).
"""

from __future__ import annotations

import json
import logging
import secrets
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

import requests
from sqlalchemy import select

from modelcd.analysis.drift import input_psi, output_psi
from modelcd.analysis.shadow import predictions_of, request_rows
from modelcd.analysis.statistics import DatasetStats
from modelcd.context import Context
from modelcd.errors import ModelcdError
from modelcd.releases.machine import Phase
from modelcd.releases.policy import OnBreach, Watch
from modelcd.releases.service import Release
from modelcd.sources.generic import DELIVERY_ID, SIGNATURE, sign
from modelcd.store import schema
from modelcd.store.db import now

log = logging.getLogger(__name__)
NOTIFY_ATTEMPTS = 3
NOTIFY_TIMEOUT_S = 5.0


@dataclass
class _Window:
    """One endpoint's watch: the rows in its window and where reading the router left off."""

    release_id: str
    version: int
    after: int = 0
    rows: deque[tuple[float, Any, Any]] = field(default_factory=deque)  # (ts, input row, prediction)
    columns: list[str] | None = None
    baseline: list[Any] | None = None  # predictions of the first full window
    next_check: float = 0.0
    breached: bool = False
    stats: DatasetStats | None = None
    stats_read: bool = False


class ProductionWatch:
    """Judges every watched endpoint's sampled traffic (see the module docstring)."""

    def __init__(self, ctx: Context) -> None:
        self.ctx = ctx
        self.windows: dict[tuple[str, str], _Window] = {}

    def tick(self) -> None:
        watched: set[tuple[str, str]] = set()
        for ep in self.ctx.traffic.list():
            if not ep.sample_rate or ep.retired_at:
                continue
            try:
                found = self._serving(ep.model, ep.environment, ep.traffic)
                if found is None:
                    continue
                rel, spec = found
                key = (ep.model, ep.environment)
                watched.add(key)
                window = self.windows.get(key)
                if window is None or window.release_id != rel.id:  # what the router kept before is not this one's
                    window = self.windows[key] = _Window(release_id=rel.id, version=rel.version,
                                                         after=self._kept_so_far(ep.model, ep.environment))
                if time.monotonic() >= window.next_check:
                    window.next_check = time.monotonic() + spec.check_every_s
                    self._check(rel, spec, window)
            except Exception:
                log.exception("production watch of %s/%s", ep.model, ep.environment)
        for key in set(self.windows) - watched:
            del self.windows[key]

    def _kept_so_far(self, model: str, environment: str) -> int:
        try:
            return int(self.ctx.router.samples(model, environment, limit=1).get("seq") or 0)
        except ModelcdError:
            return 0

    def _serving(self, model: str, environment: str, traffic: dict[str, int]) -> tuple[Release, Watch] | None:
        """The release that made the endpoint serve what it serves, and its watch."""
        serving = max(traffic.items(), key=lambda kv: kv[1], default=(None, 0))
        if serving[0] is None or serving[1] <= 0:
            return None
        dep = self.ctx.deployments.get(serving[0])
        for rel in self.ctx.releases.list(model=model, environment=environment, phase=str(Phase.SUCCEEDED), limit=20):
            if rel.version == dep.version:
                spec = rel.environment_policy.watch
                return (rel, spec) if spec is not None else None
        return None

    # -- one check --------------------------------------------------------------------------
    def _check(self, rel: Release, spec: Watch, window: _Window) -> None:
        self._read(rel, window)
        cutoff = time.time() - spec.window_s
        while window.rows and window.rows[0][0] < cutoff:
            window.rows.popleft()
        rows = len(window.rows)
        limits = {"max_input_psi": spec.max_input_psi, "max_prediction_psi": spec.max_prediction_psi,
                  "window_s": spec.window_s, "min_samples": spec.min_samples, "on_breach": str(spec.on_breach)}
        figures: dict[str, Any] = {"rows": rows, "input_psi": {}, "prediction_psi": None, "limits": limits}
        if rows < spec.min_samples:
            self._status(rel, "collecting", figures)
            return
        predictions = [p for _, _, p in window.rows]
        breaches: list[str] = []
        if spec.max_prediction_psi is not None:
            if window.baseline is None:
                window.baseline = predictions  # the reference: what the new version answered first
            else:
                value = output_psi(window.baseline, predictions)
                figures["prediction_psi"] = value
                if value > spec.max_prediction_psi:
                    breaches.append(f"prediction PSI {value:.3f} above max_prediction_psi {spec.max_prediction_psi:g}")
        if spec.max_input_psi is not None:
            stats = self._stats(rel, window)
            if stats is None:
                figures["input_psi_error"] = (f"v{rel.version} has no training statistics: compute them with "
                                              f"`modelcd statistics {rel.model} {rel.version} --training-data FILE`")
            else:
                names = window.columns or stats.names
                records = [dict(zip(names, r, strict=False)) if isinstance(r, list) else r
                           for _, r, _ in window.rows]
                values = dict(input_psi(stats, records))
                figures["input_psi"] = values
                over = {k: v for k, v in values.items() if v > spec.max_input_psi}
                if over:
                    name, value = max(over.items(), key=lambda kv: kv[1])
                    breaches.append(f"input PSI of {name} {value:.3f} above max_input_psi {spec.max_input_psi:g}")
        if not breaches:
            window.breached = False
            self._status(rel, "ok", figures)
            return
        if window.breached:  # reported already; again only after a window within the limits
            self._status(rel, "breached", figures)
            return
        window.breached = True
        self._breach(rel, spec, figures, "; ".join(breaches))

    def _read(self, rel: Release, window: _Window) -> None:
        """Add the router's samples since the last read to the window."""
        while True:
            try:
                batch = self.ctx.router.samples(rel.model, rel.environment, after=window.after, limit=5000)
            except ModelcdError as e:
                log.info("production watch of %s/%s: %s", rel.model, rel.environment, e.message)
                return
            records = batch.get("pairs") or []
            for record in records:
                self._add(window, record)
            if records:
                window.after = int(records[-1]["seq"])
            if len(records) < 5000:
                return

    @staticmethod
    def _add(window: _Window, record: dict[str, Any]) -> None:
        answer = record.get("answer") or {}
        if record.get("truncated") or answer.get("status") != 200:
            return
        try:
            columns, rows = request_rows(json.loads(record.get("request") or "null"))
            predictions = predictions_of(json.loads(answer.get("body") or "null"))
        except (ValueError, TypeError):
            return
        if len(rows) != len(predictions):
            return
        if columns and window.columns is None:
            window.columns = columns
        ts = float(record.get("ts") or time.time())
        window.rows.extend((ts, r, p) for r, p in zip(rows, predictions, strict=True))

    def _stats(self, rel: Release, window: _Window) -> DatasetStats | None:
        if not window.stats_read:
            try:
                doc = self.ctx.registry.get_statistics(rel.model, rel.version)
                window.stats = DatasetStats.from_dict(doc["statistics"])
                window.stats_read = True
            except ModelcdError:
                return None  # asked again at the next check: statistics may be computed meanwhile
        return window.stats

    # -- what a breach does -------------------------------------------------------------------
    def _breach(self, rel: Release, spec: Watch, figures: dict[str, Any], why: str) -> None:
        ctx = self.ctx
        action = "on_breach: " + str(spec.on_breach)
        message = f"{rel.model}/{rel.environment} v{rel.version}: {why} over the last {spec.window_s:g}s " \
                  f"({figures['rows']} requests sampled); {action}"
        ctx.jobs.event(None, rel.id, "watch.breach", message)
        self._status(rel, "breached", figures, breach=True)
        outcome = "alerted"
        latest = ctx.releases.list(model=rel.model, environment=rel.environment, phase=str(Phase.SUCCEEDED), limit=1)
        if spec.on_breach is OnBreach.ROLLBACK and latest and latest[0].id != rel.id:
            # the version serving now came back by a rollback: rolling back again would return to
            # the newer version that breached first (drifting inputs breach both alike)
            outcome = "alert only: this version serves after a rollback"
        elif spec.on_breach is OnBreach.ROLLBACK:
            from modelcd.releases.manual import rollback_endpoint

            try:
                rollback_endpoint(ctx, rel.model, rel.environment)
                outcome = "rolled back"
                ctx.jobs.event(None, rel.id, "watch.rolled_back", f"traffic of {rel.model}/{rel.environment} "
                               "returned to the previous version")
            except ModelcdError as e:
                outcome = f"rollback refused: {e.message}"
                ctx.jobs.event(None, rel.id, "watch.rollback_failed", e.message)
        self._notify({"event": "watch.breach", "model": rel.model, "environment": rel.environment,
                      "version": rel.version, "release_id": rel.id, "reason": why, "figures": figures,
                      "action": str(spec.on_breach), "outcome": outcome, "at": now()})

    def _status(self, rel: Release, state: str, figures: dict[str, Any], breach: bool = False) -> None:
        table = schema.watch_status
        ts = now()
        with self.ctx.db.write() as conn:
            row = conn.execute(select(table).where(table.c.model == rel.model,
                                                   table.c.environment == rel.environment)).first()
            values: dict[str, Any] = {"release_id": rel.id, "version": rel.version, "state": state,
                                      "figures": figures, "updated_at": ts}
            if breach:
                values["breaches"] = (row._mapping["breaches"] if row is not None else 0) + 1
                values["last_breach_at"] = ts
            if row is None:
                conn.execute(table.insert().values(model=rel.model, environment=rel.environment,
                                                   **{"breaches": 0, **values}))
            else:
                conn.execute(table.update().where(table.c.model == rel.model,
                                                  table.c.environment == rel.environment).values(**values))

    def _notify(self, payload: dict[str, Any]) -> None:
        """POST the signed notification to each configured URL, off this thread (bounded retries)."""
        settings = self.ctx.settings
        if not settings.notify_urls:
            return
        if not settings.notify_secret:
            log.warning("notify_urls are set but notify_secret is not: breach notifications are not sent unsigned")
            return
        body = json.dumps(payload, sort_keys=True).encode()
        delivery = secrets.token_hex(12)
        for url in settings.notify_urls:
            threading.Thread(target=_deliver, args=(url, body, settings.notify_secret, delivery),
                             name="notify", daemon=True).start()


def _deliver(url: str, body: bytes, secret: str, delivery: str) -> None:
    for attempt in range(NOTIFY_ATTEMPTS):
        headers = {"Content-Type": "application/json", SIGNATURE: sign(secret, int(time.time()), body),
                   DELIVERY_ID: delivery, "User-Agent": "modelcd-notify"}
        try:
            r = requests.post(url, data=body, headers=headers, timeout=NOTIFY_TIMEOUT_S)
            if r.status_code < 500:
                if r.status_code >= 400:
                    log.warning("notification to %s refused: %s", url, r.status_code)
                return
        except requests.RequestException as e:
            log.info("notification to %s failed (attempt %d): %s", url, attempt + 1, type(e).__name__)
        time.sleep(2.0 ** attempt)
    log.warning("notification to %s not delivered after %d attempts", url, NOTIFY_ATTEMPTS)


def watch_status(ctx: Context) -> list[dict[str, Any]]:
    """Every endpoint's watch status (``/metrics``, ``endpoints show``)."""
    with ctx.db.read() as conn:
        return [dict(r._mapping) for r in conn.execute(select(schema.watch_status))]
