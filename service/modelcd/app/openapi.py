"""The OpenAPI 3.1 document of ``/api/v1``, built from one table of operations."""

from __future__ import annotations

from typing import Any

import modelcd

# (method, path, summary, write?, request body kind)
OPERATIONS: list[tuple[str, str, str, bool, str | None]] = [
    ("get", "/models", "List models", False, None),
    ("get", "/models/{name}", "Show a model (archived or not, and the releases archiving skipped)", False, None),
    ("post", "/models/{name}/archive", "Archive a model: versions are still recorded, no release starts (409 "
     "while one runs; queued ones are cancelled); answers the job", True, None),
    ("post", "/models/{name}/unarchive", "Let releases of an archived model start again; answers the job", True,
     None),
    ("get", "/models/{name}/versions", "List a model's versions", False, None),
    ("post", "/models/{name}/versions", "Register a version (multipart: artifact tar.gz + metadata JSON)", True,
     "multipart"),
    ("get", "/models/{name}/versions/{version}", "Show a version", False, None),
    ("post", "/models/{name}/versions/{version}/statistics", "Compute the version's training-data statistics "
     "(multipart: data = CSV with a header row, Parquet or JSON lines) in a `statistics` job; 202 with the job",
     True, "training_data"),
    ("get", "/models/{name}/versions/{version}/statistics", "The version's training-data statistics: rows, per "
     "feature counts, missing, min/max/mean/std, bin edges and counts, top categories (404 when none)", False, None),
    ("post", "/models/{name}/versions/{version}/evaluations", "Evaluate the version on labelled data {data (path, "
     "s3:// or sql:// URI), label, metrics (accuracy,f1,precision,recall,roc_auc | rmse,mae,r2), format, connection, "
     "max_errors} in an `evaluate` job scoring it in its own environment; 202 with the job", True, "json"),
    ("get", "/models/{name}/versions/{version}/evaluations", "The version's stored evaluations, newest first: data, "
     "its digest, label, rows, metrics, confusion matrix or residual summary, job", False, None),
    ("get", "/models/{name}/versions/{version}/plan", "What a release of the version would do, changing nothing: "
     "policy and why, environments, strategy, gates, artifact (built?), what retires, what a rollback returns to "
     "(?environment=: a promote there)", False, None),
    ("get", "/releases", "List releases (filters: model, environment, phase)", False, None),
    ("post", "/releases", "Start a release of {model, version, environment}", True, "json"),
    ("get", "/releases/{release_id}", "Show a release with its jobs and events", False, None),
    ("post", "/releases/{release_id}/stop", "Stop a release (rolls back; production untouched)", True, None),
    ("post", "/releases/{release_id}/approve", "Approve a release waiting at its approval gate (optional JSON "
     "{comment}): traffic moves", True, "json"),
    ("post", "/releases/{release_id}/reject", "Reject a release waiting at its approval gate (optional JSON "
     "{comment}): it rolls back and fails", True, "json"),
    ("post", "/releases/{release_id}/stages/{stage}", "Run a stage of the release (build, deploy, smoke, promote, "
     "rollback); answers its result, or 202 running after ?wait= seconds (default 20); the API token or the "
     "release's pipeline token", True, None),
    ("get", "/releases/{release_id}/stages/{stage}", "The result of a stage started with POST (202 while it runs; "
     "?wait= seconds to wait for it)", False, None),
    ("post", "/releases/{release_id}/report", "A pipeline reports a stage's {stage, outcome, message}; the API token "
     "or the release's pipeline token", True, "json"),
    ("post", "/releases/{release_id}/stages/{stage}/begin", "A pipeline's runner opens a stage it does itself "
     "(policy pipeline.stages): the job and its work, or {run_in: service}; the API token or the release's "
     "pipeline token", True, None),
    ("post", "/releases/{release_id}/jobs/{job_id}/log", "A runner adds {lines} to its stage's log; answers "
     "{cancel} when a person stopped the release", True, "json"),
    ("post", "/releases/{release_id}/jobs/{job_id}/finish", "A runner closes its stage with {outcome, error, "
     "report}; the service checks the report (image digest, reachable deployment) before the release moves on",
     True, "json"),
    ("get", "/releases/{release_id}/files", "The release's model files as a tar.gz (for a runner's build); the "
     "API token or the release's pipeline token", True, None),
    ("get", "/jobs", "List jobs", False, None),
    ("get", "/jobs/{job_id}", "Show a job with its events", False, None),
    ("get", "/jobs/{job_id}/logs", "A job's log lines (after=<id> to follow)", False, None),
    ("post", "/jobs/{job_id}/stop", "Stop a job (and its release)", True, None),
    ("get", "/endpoints", "List endpoints with their traffic (?model=, ?limit= 1-1000, default 100)", False, None),
    ("get", "/endpoints/{model}/{environment}", "Show an endpoint: uri and traffic {version: weight}", False, None),
    ("post", "/endpoints/{model}/{environment}/promote", "Release {version} to this endpoint", True, "json"),
    ("post", "/endpoints/{model}/{environment}/rollback", "Back to the previous version", True, None),
    ("post", "/endpoints/{model}/{environment}/retire", "Retire an endpoint: traffic to zero (the router answers "
     "410), its deployments stopped, records kept (409 while a release of it runs; queued ones are cancelled); "
     "answers the job", True, None),
    ("post", "/endpoints/{model}/{environment}/keys",
     "The endpoint's scoring keys, shown once: made on the first call, or {regenerate: primary|secondary}", True,
     "json"),
    ("get", "/deployments", "List deployments", False, None),
    ("post", "/images/prune", "Remove the scoring images (docker target) of versions nothing needs: no deployment "
     "that is not stopped, not on an endpoint's traffic, previous traffic or shadow copies, no pending release; "
     "JSON {dry_run: true} says what would go (admin)", True, "json"),
    ("post", "/data-plane/stop", "Stop the router and every deployment; the service leaves them down until it "
     "restarts (what `modelcd shutdown` asks a running service)", True, None),
    ("post", "/sources/mlflow/connect", "Create or update the MLflow webhook that calls this service "
     "({tracking_uri, url}); the secret and tracking URI are saved and used at once, without a restart", True,
     "json"),
    ("get", "/policies", "List release policies", False, None),
    ("put", "/policies", "Create or replace a release policy (YAML body)", True, "yaml"),
    ("post", "/policies/plan", "Which current versions a release policy (YAML body) would change, and how; "
     "nothing is stored", True, "yaml"),
    ("get", "/policies/{name}", "Show a release policy", False, None),
    ("delete", "/policies/{name}", "Delete a release policy", True, None),
    ("get", "/inbox", "Webhook deliveries (filters: state=pending|done|ignored|dead, source)", False, None),
    ("get", "/inbox/{id}", "One delivery with its body, result and last error", False, None),
    ("post", "/inbox/{id}/retry", "Send a dead delivery back for processing", True, None),
    ("post", "/batch", "Create a batch deployment {name, model, version | environment, input, output, schedule, "
     "zone, format, keys, max_errors, catch_up}: scheduled or manual scoring of a dataset", True, "json"),
    ("get", "/batch", "List batch deployments with their next run", False, None),
    ("get", "/batch/{name}", "Show a batch deployment: its spec, next run and newest runs (jobs)", False, None),
    ("delete", "/batch/{name}", "Delete a batch deployment (409 naming the run while one is in progress)", True,
     None),
    ("post", "/batch/{name}/run", "Run a batch deployment now: 202 with its batch_prediction job (409 while a run "
     "is in progress)", True, None),
    ("post", "/batch/{name}/pause", "Pause a batch deployment's schedule", True, None),
    ("post", "/batch/{name}/resume", "Resume a batch deployment's schedule (from now: what fell due while paused "
     "does not run)", True, None),
    ("post", "/connections", "Add a named SQL connection {name, url_env}: url_env names the environment variable "
     "of the service holding the SQLAlchemy URL (the URL itself is never stored or shown)", True, "json"),
    ("get", "/connections", "List connections: name, url_env and whether that variable is set", False, None),
    ("delete", "/connections/{name}", "Remove a connection", True, None),
    ("get", "/users", "List users and their roles (admin)", True, None),
    ("post", "/users", "Add a user {name, role}; role: viewer, deployer, approver or admin (admin)", True, "json"),
    ("post", "/users/{user}/role", "Change a user's role {role} (admin)", True, "json"),
    ("post", "/users/{user}/disable", "Refuse every token of the user from the next request; user and tokens are "
     "kept (admin)", True, None),
    ("post", "/users/{user}/enable", "Accept the user's tokens again (admin)", True, None),
    ("delete", "/users/{user}", "Remove a user; their tokens are revoked (admin)", True, None),
    ("post", "/tokens", "Make an API token {user, name}: the answer's `token` is shown this once and stored only "
     "as a hash (admin: anyone's; a user: their own)", True, "json"),
    ("get", "/tokens", "List tokens (?user=): id, user, label, prefix, created, last used, revoked; never the token "
     "(admin: anyone's; a user: their own)", True, None),
    ("delete", "/tokens/{token_id}", "Revoke a token: refused from the next request on (admin: anyone's; a user: "
     "their own)", True, None),
    ("get", "/openapi.json", "This document", False, None),
]

ERROR = {"type": "object", "properties": {"code": {"type": "string"}, "message": {"type": "string"},
                                         "field": {"type": ["string", "null"]}}, "required": ["code", "message"]}

BODIES: dict[str, dict[str, Any]] = {
    "multipart": {"multipart/form-data": {"schema": {"type": "object", "required": ["artifact"], "properties": {
        "artifact": {"type": "string", "format": "binary", "description": "tar.gz of the model's files"},
        "metadata": {"type": "string", "description": "JSON: flavor, requirements, sample, expected, metrics, "
                                                      "tags, description"}}}}},
    "training_data": {"multipart/form-data": {"schema": {"type": "object", "required": ["data"], "properties": {
        "data": {"type": "string", "format": "binary",
                 "description": "training data: CSV (header row), Parquet or JSON lines"}}}}},
    "json": {"application/json": {"schema": {"type": "object"}}},
    "yaml": {"application/yaml": {"schema": {"type": "string"}}},
}


def _operation(method: str, path: str, summary: str, write: bool, body: str | None) -> dict[str, Any]:
    op: dict[str, Any] = {
        "summary": summary,
        "operationId": f"{method}_{path.strip('/').replace('/', '_').replace('{', '').replace('}', '')}",
        "parameters": [{"name": p.strip("{}"), "in": "path", "required": True,
                        "schema": {"type": "integer" if p in ("{version}", "{id}") else "string"}}
                       for p in path.split("/") if p.startswith("{")],
        "responses": {"200": {"description": "OK", "content": {"application/json": {"schema": {"type": "object"}}}},
                      "4XX": {"description": "Bad request", "content": {"application/json": {"schema": ERROR}}}},
    }
    if write:
        op["security"] = [{"bearer": []}]
        op["responses"]["401"] = {"description": "Missing or wrong token",
                                  "content": {"application/json": {"schema": ERROR}}}
        op["responses"]["403"] = {"description": "The token's role does not grant this (the message names the "
                                  "roles that do)", "content": {"application/json": {"schema": ERROR}}}
    if body:
        op["requestBody"] = {"required": True, "content": BODIES[body]}
    return op


def document() -> dict[str, Any]:
    paths: dict[str, dict[str, Any]] = {}
    for method, path, summary, write, body in OPERATIONS:
        paths.setdefault(path, {})[method] = _operation(method, path, summary, write, body)
    return {
        "openapi": "3.1.0",
        "info": {"title": "modelcd API", "version": modelcd.__version__},
        "servers": [{"url": "/api/v1"}],
        "components": {"securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}}},
        "paths": paths,
    }
