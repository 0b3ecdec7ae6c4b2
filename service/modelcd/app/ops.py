"""Health, readiness (always open) and Prometheus metrics (open or closed with the API's reads:
``MODELCD_OPEN_READS``) of the control plane."""

from __future__ import annotations

from typing import Any

from flask import Blueprint, Response, current_app, jsonify
from sqlalchemy import func, select, text

from modelcd.app.api import open_route, read
from modelcd.context import Context
from modelcd.store import schema

bp = Blueprint("ops", __name__)


def _ctx() -> Context:
    return current_app.extensions["modelcd"]


@bp.get("/healthz")
@open_route
def healthz() -> Response:
    return jsonify({"status": "ok"})


@bp.get("/readyz")
@open_route
def readyz() -> tuple[Response, int]:
    ctx = _ctx()
    checks: dict[str, str] = {}
    try:
        with ctx.db.read() as conn:
            conn.execute(text("SELECT 1"))
        checks["database"] = "ok"
    except Exception as e:
        checks["database"] = f"error: {type(e).__name__}"
    try:
        ctx.router.read()
        checks["router"] = "ok"
    except Exception as e:
        checks["router"] = f"error: {type(e).__name__}"
    ok = all(v == "ok" for v in checks.values())
    return jsonify({"status": "ok" if ok else "unavailable", "checks": checks}), 200 if ok else 503


@bp.get("/metrics")
@read  # open or closed with the API's reads (MODELCD_OPEN_READS)
def metrics() -> Response:
    ctx = _ctx()
    lines = ["# HELP modelcd_http_requests_total API requests by method and status",
             "# TYPE modelcd_http_requests_total counter"]
    for (method, status), n in sorted(current_app.extensions["modelcd_metrics"].items()):
        lines.append(f'modelcd_http_requests_total{{method="{method}",status="{status}"}} {int(n)}')
    with ctx.db.read() as conn:
        phases = conn.execute(select(schema.releases.c.phase, func.count()).group_by(schema.releases.c.phase)).all()
        states = conn.execute(select(schema.deployments.c.state, func.count())
                              .group_by(schema.deployments.c.state)).all()
        pending = conn.execute(select(func.count()).select_from(schema.outbox)
                               .where(schema.outbox.c.processed_at.is_(None))).scalar()
    lines += ["# HELP modelcd_releases releases by phase", "# TYPE modelcd_releases gauge"]
    lines += [f'modelcd_releases{{phase="{p}"}} {n}' for p, n in phases]
    lines += ["# HELP modelcd_deployments deployments by state", "# TYPE modelcd_deployments gauge"]
    lines += [f'modelcd_deployments{{state="{s}"}} {n}' for s, n in states]
    lines += ["# HELP modelcd_outbox_pending outbox events not yet dispatched", "# TYPE modelcd_outbox_pending gauge",
              f"modelcd_outbox_pending {pending}"]
    lines += _watch_lines(ctx)
    return Response("\n".join(lines) + "\n", mimetype="text/plain; version=0.0.4")


def _watch_lines(ctx: Context) -> list[str]:
    """The production watch's figures per endpoint (releases.watch)."""
    from modelcd.releases.watch import watch_status

    rows = watch_status(ctx)
    lines = ["# HELP modelcd_watch_breaches_total production watch breaches by endpoint",
             "# TYPE modelcd_watch_breaches_total counter"]
    lines += [f'modelcd_watch_breaches_total{{{_labels(r)}}} {int(r["breaches"])}' for r in rows]
    lines += ["# HELP modelcd_watch_input_psi live inputs vs the training statistics, per feature",
              "# TYPE modelcd_watch_input_psi gauge"]
    for r in rows:
        for feature, value in sorted(((r["figures"] or {}).get("input_psi") or {}).items()):
            lines.append(f'modelcd_watch_input_psi{{{_labels(r)},feature="{_escape(feature)}"}} {float(value):.6g}')
    lines += ["# HELP modelcd_watch_prediction_psi live outputs vs the first window after the release",
              "# TYPE modelcd_watch_prediction_psi gauge"]
    for r in rows:
        value = (r["figures"] or {}).get("prediction_psi")
        if value is not None:
            lines.append(f"modelcd_watch_prediction_psi{{{_labels(r)}}} {float(value):.6g}")
    return lines


def _labels(row: dict[str, Any]) -> str:
    return f'model="{_escape(row["model"])}",environment="{_escape(row["environment"])}"'


def _escape(value: str) -> str:
    return str(value).replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
