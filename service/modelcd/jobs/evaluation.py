"""The ``evaluate`` job: a version scored on labelled data in its own environment, its metrics
(``batch.evaluation``) stored with the version (``Registry.put_evaluation``), as ModelOps
tools do before approving a model. Asked for by ``POST /models/<name>/versions/<n>/evaluations``
(``modelcd evaluate``), run on a worker thread of this process; the release engine's
``evaluate`` stage (``releases.evaluation_gate``) runs the same ``evaluate_and_store``.

A job interrupted by a restart fails ("run the evaluation again"): nothing half-computed is
kept."""

from __future__ import annotations

import logging
import re
import threading
import urllib.parse
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from modelcd.domain import JobState, JobType
from modelcd.errors import InvalidInput

if TYPE_CHECKING:  # the CLI imports evaluation_line: keep the service's wiring out of its start
    from modelcd.context import Context
    from modelcd.jobs.service import Job

log = logging.getLogger(__name__)

MAX_RUNNING = 2  # evaluations computed at once in one process; more wait as scheduled
_slots = threading.BoundedSemaphore(MAX_RUNNING)
_TABLE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,62}(\.[A-Za-z_][A-Za-z0-9_]{0,62})?$")
FIELDS = ("data", "label", "metrics", "format", "connection", "max_errors")


def evaluation_spec(ctx: Context, model: str, version: int, body: Any) -> dict[str, Any]:
    """What to evaluate, from a request body ``{data, label, metrics?, format?, connection?,
    max_errors?}``, checked before a job exists; InvalidInput / NotFound naming the field."""
    from modelcd.batch.datasets import Connections, check_format, parse_uri
    from modelcd.batch.evaluation import check_label
    from modelcd.batch.metrics import parse_metrics

    if not isinstance(body, dict):
        raise InvalidInput("send a JSON object {data, label, metrics, format, connection}", field="body")
    unknown = sorted(set(body) - set(FIELDS))
    if unknown:
        raise InvalidInput(f"unknown field {unknown[0]!r}; the fields are {', '.join(FIELDS)}", field=unknown[0])
    ctx.registry.get_version(model, version)
    data = body.get("data")
    if not isinstance(data, str) or not data.strip() or len(data) > 1024:
        raise InvalidInput("data is missing: give the labelled data as a local path, s3://bucket/prefix/ or "
                           "sql://CONNECTION/TABLE (--data URI)", field="data")
    data = data.strip()
    connection = body.get("connection")
    if connection is not None:
        data = _with_connection(data, connection)
    loc = parse_uri(data, "data")
    if loc.kind == "file" and loc.path is not None and not loc.path.exists():
        raise InvalidInput(f"data: {loc.path} does not exist (paths are read by the service, on its host)",
                           field="data")
    if loc.kind == "sql":
        Connections(ctx.db).url(loc.connection, "data")
    fmt = body.get("format")
    if fmt is not None:
        if not isinstance(fmt, str):
            raise InvalidInput("format must be csv, parquet or jsonl", field="format")
        check_format(fmt)
    max_errors = body.get("max_errors", 0)
    if max_errors is not None and (isinstance(max_errors, bool) or not isinstance(max_errors, int)
                                   or not 0 <= max_errors <= 2**31):
        raise InvalidInput(f"max_errors must be a whole number from 0 (got {str(max_errors)[:40]!r})",
                           field="max_errors")
    metrics = parse_metrics(body.get("metrics"))
    return {"data": data, "label": check_label(body.get("label")), "metrics": list(metrics) if metrics else None,
            "format": fmt, "max_errors": max_errors}


def _with_connection(data: str, connection: Any) -> str:
    """``--connection NAME`` with a table name or a SELECT as the data: its sql:// URI."""
    if not isinstance(connection, str) or not re.fullmatch(r"[A-Za-z][A-Za-z0-9_-]{0,63}", connection):
        raise InvalidInput("connection must be the name of a connection (`modelcd connections list`)",
                           field="connection")
    if "://" in data:
        raise InvalidInput("connection: give --data as a table name or a SELECT query with --connection, or a "
                           "full URI without it", field="connection")
    if _TABLE.match(data):
        return f"sql://{connection}/{data}"
    if data.lower().startswith("select "):
        return f"sql://{connection}?" + urllib.parse.urlencode({"query": data})
    raise InvalidInput(f"data: {data[:80]!r} is neither a table name nor a SELECT query", field="data")


def start_evaluation_job(ctx: Context, model: str, version: int, body: Any, by: str | None = None) -> Job:
    """Check the request, create the job (``by``: who asked) and evaluate on a worker thread;
    returns the job, scheduled."""
    spec = evaluation_spec(ctx, model, version, body)
    job = ctx.jobs.create(JobType.EVALUATE, model=model, version=version, actor=by)
    ctx.jobs.transition(job.id, JobState.SCHEDULED, f"evaluation of {model} v{version} on {spec['data']} "
                                                    f"(label {spec['label']})")
    threading.Thread(target=_in_thread, args=(ctx, job.id, spec), name=f"evaluate-{job.id}", daemon=True).start()
    return ctx.jobs.get(job.id)


def _in_thread(ctx: Context, job_id: str, spec: dict[str, Any]) -> None:
    with _slots:
        try:
            run_evaluation_job(ctx, job_id, spec)
        except Exception:
            log.exception("evaluation job %s", job_id)


def run_evaluation_job(ctx: Context, job_id: str, spec: dict[str, Any]) -> bool:
    """Evaluate and store for the job's version; the job ends succeeded, failed (the cause in
    its error and log) or cancelled. True when stored."""

    def body(job: Job, write: Callable[[str], None], cancel: threading.Event) -> str:
        assert job.model is not None and job.version is not None
        stored = evaluate_and_store(ctx, job.model, job.version, spec, job_id=job_id, log=write, cancel=cancel)
        return f"{evaluation_line(stored)}; stored with {job.model} v{job.version}"

    return ctx.jobs.run_to_end(job_id, f"scoring {spec['data']}", body, "evaluation")


def evaluate_and_store(ctx: Context, model: str, version: int, spec: dict[str, Any], *, job_id: str | None,
                       log: Callable[[str], None], cancel: threading.Event,
                       release_id: str | None = None) -> dict[str, Any]:
    """Evaluate ``model`` v``version`` as ``spec`` says, store the result with the version and
    record an ``evaluation.result`` event carrying the figures; returns the stored evaluation."""
    from modelcd.batch.evaluation import evaluate_dataset

    log(f"evaluating {model} v{version} on {spec['data']} (label {spec['label']!r}"
        + (f", metrics {', '.join(spec['metrics'])}" if spec.get("metrics") else "") + ")")
    result = evaluate_dataset(ctx, model=model, version=version, data_uri=spec["data"], label=spec["label"],
                              metrics=spec.get("metrics"), fmt=spec.get("format"), log=log, cancel=cancel,
                              max_errors=spec.get("max_errors", 0))
    stored = ctx.registry.put_evaluation(model, version, data_uri=spec["data"], data_digest=result["data_digest"],
                                         label=spec["label"], result=result, job_id=job_id)
    ctx.jobs.event(job_id, release_id, "evaluation.result", f"{model} v{version}: {evaluation_line(stored)}")
    return stored


def evaluation_line(e: dict[str, Any]) -> str:
    """One line of a stored evaluation for logs, events and the CLI."""
    figures = ", ".join(f"{k} {v:.4g}" for k, v in e["metrics"].items())
    return f"{figures} on {e['rows']} rows of {e['data']} (label {e['label']})"


def fail_interrupted(ctx: Context, echo: Callable[[str], None] | None = None) -> list[str]:
    """At start: evaluate jobs of no release that a dead process left open end (failed when
    running, else cancelled). Returns their ids."""
    return ctx.jobs.end_interrupted(JobType.EVALUATE, "interrupted by a restart of the service; run the "
                                    "evaluation again (`modelcd evaluate`)", echo, of_releases=False)
