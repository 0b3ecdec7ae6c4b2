"""Tables. SQLAlchemy Core, portable between SQLite (default) and PostgreSQL.

Timestamps are ISO-8601 UTC strings; JSON columns hold plain JSON values."""

from __future__ import annotations

from sqlalchemy import (
    JSON,
    Boolean,
    Column,
    Float,
    ForeignKeyConstraint,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Table,
    Text,
    UniqueConstraint,
)

metadata = MetaData()

models = Table(
    "models", metadata,
    Column("name", String(64), primary_key=True),
    Column("description", Text, nullable=False, default=""),
    Column("created_at", String(32), nullable=False),
    Column("archived_at", String(32)),  # archived (releases.retirement): versions recorded, no release starts
)

versions = Table(
    "versions", metadata,
    Column("model", String(64), primary_key=True),
    Column("version", Integer, primary_key=True),
    Column("digest", String(64), nullable=False),
    Column("flavor", String(16), nullable=False),
    Column("model_file", String(512)),
    Column("entry_script", String(512)),
    Column("requirements", JSON, nullable=False),
    Column("sample", JSON),
    Column("expected", JSON),
    Column("metrics", JSON, nullable=False),
    Column("tags", JSON, nullable=False),
    Column("description", Text, nullable=False, default=""),
    Column("source", String(16), nullable=False),
    Column("external_ref", String(1024)),
    Column("artifact_uri", String(1024), nullable=False),
    Column("size_bytes", Integer, nullable=False, default=0),
    Column("status", String(16), nullable=False, default="ready"),  # ready | referenced (no files here)
    Column("created_at", String(32), nullable=False),
    ForeignKeyConstraint(["model"], ["models.name"]),
    # one version per external version: a redelivered webhook finds the version it already made
    UniqueConstraint("model", "source", "external_ref", name="uq_versions_external"),
)

version_statistics = Table(  # training-data statistics of a version (analysis.statistics, jobs.statistics)
    "version_statistics", metadata,
    Column("model", String(64), primary_key=True),
    Column("version", Integer, primary_key=True),
    Column("stats", JSON, nullable=False),  # DatasetStats.to_dict(): plain JSON
    Column("rows", Integer, nullable=False),
    Column("features", Integer, nullable=False),
    Column("source", String(256), nullable=False),  # the training data's file name (or MLflow artifact path)
    Column("job_id", String(32)),  # the statistics job that computed them
    Column("created_at", String(32), nullable=False),
    ForeignKeyConstraint(["model", "version"], ["versions.model", "versions.version"]),
)

version_evaluations = Table(  # a version's metrics on labelled data (batch.evaluation, jobs.evaluation)
    "version_evaluations", metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("model", String(64), nullable=False),
    Column("version", Integer, nullable=False),
    Column("data_uri", String(1024), nullable=False),
    Column("data_digest", String(80)),  # sha256 of the files (or S3 keys, sizes, ETags); None for a SQL source
    Column("label", String(256), nullable=False),
    Column("task", String(16), nullable=False),  # classification | regression
    Column("rows", Integer, nullable=False),  # rows compared (scored and labelled)
    Column("metrics", JSON, nullable=False),  # {name: value}
    Column("result", JSON, nullable=False),  # everything else: confusion matrix or residuals, counts, errors
    Column("job_id", String(32)),  # the evaluate job
    Column("created_at", String(32), nullable=False),
    ForeignKeyConstraint(["model", "version"], ["versions.model", "versions.version"]),
)
Index("ix_version_evaluations_version", version_evaluations.c.model, version_evaluations.c.version)

policies = Table(
    "policies", metadata,
    Column("name", String(64), primary_key=True),
    Column("revision", Integer, nullable=False),
    Column("text", Text, nullable=False),
    Column("updated_at", String(32), nullable=False),
)

releases = Table(
    "releases", metadata,
    Column("id", String(32), primary_key=True),
    Column("model", String(64), nullable=False),
    Column("version", Integer, nullable=False),
    Column("environment", String(32), nullable=False),
    Column("policy_name", String(64), nullable=False),
    Column("policy", JSON, nullable=False),  # snapshot of the policy revision used
    Column("env_index", Integer, nullable=False, default=0),  # position in policy.environments
    Column("trigger", String(16), nullable=False),  # auto | manual | rollback
    Column("phase", String(16), nullable=False),
    Column("cancel_requested", Boolean, nullable=False, default=False),
    Column("error", Text),
    Column("deployment_id", String(32)),
    Column("bundle", String(1024)),
    Column("image", String(512)),  # an image built by the pipeline's runner: its pushed reference
    Column("image_digest", String(80)),  # …and its digest (sha256:…), checked against what is deployed
    Column("analysis", JSON),  # verdicts on what the candidate predicted, per step (releases.judging)
    Column("previous_traffic", JSON),  # endpoint split before this release first moved traffic (recorded once)
    Column("endpoint_previous", JSON),  # the endpoint's own previous_traffic then: restored with it on rollback
    Column("created_at", String(32), nullable=False),
    Column("updated_at", String(32), nullable=False),
    Column("finished_at", String(32)),
)
Index("ix_releases_phase", releases.c.phase)
Index("ix_releases_endpoint", releases.c.model, releases.c.environment)
Index("ix_releases_created", releases.c.created_at)  # newest first (console and API lists): no sort of the table

jobs = Table(
    "jobs", metadata,
    Column("id", String(32), primary_key=True),
    Column("release_id", String(32)),
    Column("type", String(16), nullable=False),
    Column("state", String(16), nullable=False),
    Column("model", String(64)),
    Column("version", Integer),
    Column("environment", String(32)),
    Column("error", Text),
    Column("cancel_requested", Boolean, nullable=False, default=False),
    Column("runs_in", String(16)),  # runner: a pipeline's runner does the work and reports it; NULL: the service
    Column("created_at", String(32), nullable=False),
    Column("started_at", String(32)),
    Column("finished_at", String(32)),
)
Index("ix_jobs_release", jobs.c.release_id)
# newest first, all or by state or type (console and API lists): a page reads its rows, not a sort of 100k jobs
Index("ix_jobs_created", jobs.c.created_at)
Index("ix_jobs_state_created", jobs.c.state, jobs.c.created_at)
Index("ix_jobs_type_created", jobs.c.type, jobs.c.created_at)

events = Table(
    "events", metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("release_id", String(32)),
    Column("job_id", String(32)),
    Column("ts", String(32), nullable=False),
    Column("kind", String(32), nullable=False),
    Column("message", Text, nullable=False, default=""),
    Column("actor", String(64)),  # the user who caused it (access.Principal.name); NULL: the engine itself
)
Index("ix_events_job", events.c.job_id)
Index("ix_events_release", events.c.release_id)

job_logs = Table(
    "job_logs", metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("job_id", String(32), nullable=False),
    Column("ts", String(32), nullable=False),
    Column("line", Text, nullable=False),
)
Index("ix_job_logs_job", job_logs.c.job_id, job_logs.c.id)

endpoints = Table(
    "endpoints", metadata,
    Column("model", String(64), primary_key=True),
    Column("environment", String(32), primary_key=True),
    Column("traffic", JSON, nullable=False),  # {deployment_id: weight}
    Column("previous_traffic", JSON),  # what served before the last release (or rollback) began
    Column("auth", String(8)),  # key | none (the policy environment's `auth`); NULL: none (made before keys)
    Column("updated_at", String(32), nullable=False),
    Column("retired_at", String(32)),  # retired (releases.retirement): no traffic, the router answers 410
    Column("mirror", JSON),  # shadow traffic: {deployment_id, sample_rate} the router copies requests to; NULL: none
    Column("sample_rate", Float),  # the production watch: share of requests the router keeps; NULL/0: none
)

watch_status = Table(  # the production watch of an endpoint: its last figures and breaches (releases.watch)
    "watch_status", metadata,
    Column("model", String(64), primary_key=True),
    Column("environment", String(32), primary_key=True),
    Column("release_id", String(32)),  # the release whose policy set the watch
    Column("version", Integer),
    Column("state", String(16), nullable=False),  # collecting | ok | breached
    Column("figures", JSON),  # {rows, input_psi: {feature: psi}, prediction_psi, limits}
    Column("breaches", Integer, nullable=False, default=0),
    Column("last_breach_at", String(32)),
    Column("updated_at", String(32), nullable=False),
)

endpoint_keys = Table(  # an endpoint's scoring keys, checked by the router
    "endpoint_keys", metadata,
    Column("model", String(64), primary_key=True),
    Column("environment", String(32), primary_key=True),
    Column("slot", String(16), primary_key=True),  # primary | secondary
    Column("key_hash", String(64), nullable=False),  # sha256 hex of the key (never the key)
    Column("created_at", String(32), nullable=False),
)

ui_sessions = Table(  # console sign-ins (app.ui.sessions): the cookie holds the id, never the token
    "ui_sessions", metadata,
    Column("id_hash", String(64), primary_key=True),  # sha256 hex of the cookie's random id
    Column("principal", String(64), nullable=False),  # access.Principal.name
    Column("role", String(16), nullable=False),
    Column("token_id", String(32)),  # the user's token signed in with; NULL: the service's API token
    Column("csrf", String(64), nullable=False),  # the secret every form of this session carries
    Column("flash", Text),  # the message the next page shows once
    Column("created_at", String(32), nullable=False),
    Column("expires_at", Float, nullable=False),  # unix time
)
Index("ix_ui_sessions_token", ui_sessions.c.token_id)

deployments = Table(
    "deployments", metadata,
    Column("id", String(32), primary_key=True),
    Column("model", String(64), nullable=False),
    Column("version", Integer, nullable=False),
    Column("environment", String(32), nullable=False),
    Column("target", String(16), nullable=False),
    Column("state", String(16), nullable=False),
    Column("url", String(256)),
    Column("pid", Integer),
    Column("port", Integer),
    Column("bundle", String(1024)),
    Column("spec", JSON),  # everything the target needs to start it again (releases.deployments.spec_values)
    Column("log_path", String(1024)),
    Column("release_id", String(32)),
    Column("created_at", String(32), nullable=False),
    Column("updated_at", String(32), nullable=False),
    Column("sleeping", JSON),  # scaled to zero (releases.idle): {since, wake_timeout_s}; its process is stopped
)
Index("ix_deployments_endpoint", deployments.c.model, deployments.c.environment, deployments.c.state)

pipeline_runs = Table(  # one per release driven by an external runner (GitHub Actions, Azure Pipelines)
    "pipeline_runs", metadata,
    Column("release_id", String(32), primary_key=True),
    Column("provider", String(16), nullable=False),  # github | azure
    Column("token_hash", String(64), nullable=False),  # sha256 of the per-release token (never the token)
    Column("state", String(16), nullable=False),  # minted | triggered | finished
    Column("run_id", String(64)),
    Column("url", String(1024)),
    Column("attempts", Integer, nullable=False, default=0),  # trigger attempts
    Column("created_at", String(32), nullable=False),
    Column("triggered_at", String(32)),
    Column("last_report_at", String(32)),
    Column("error", Text),
)

github_deployments = Table(  # the GitHub deployment shown for a release run by GitHub (pipelines/deployments.py)
    "github_deployments", metadata,
    Column("release_id", String(32), primary_key=True),
    Column("repo", String(160), nullable=False),  # owner/name
    Column("model", String(64), nullable=False),
    Column("environment", String(32), nullable=False),
    Column("deployment_id", Integer),  # GitHub's id; NULL while it is being created
    Column("state", String(16)),  # the last status posted: in_progress | success | failure | inactive
    Column("claimed_at", Float, nullable=False),  # unix time its creation was claimed (one handler creates it)
    Column("updated_at", String(32), nullable=False),
)
Index("ix_github_deployments_env", github_deployments.c.repo, github_deployments.c.environment)

outbox = Table(
    "outbox", metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("kind", String(64), nullable=False),
    Column("payload", JSON, nullable=False),
    Column("created_at", String(32), nullable=False),
    Column("processed_at", String(32)),
    Column("error", Text),
)
Index("ix_outbox_pending", outbox.c.processed_at)

inbox = Table(
    "inbox", metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("source", String(16), nullable=False),
    Column("delivery_id", String(256), nullable=False),
    Column("received_at", String(32), nullable=False),
    Column("headers", JSON, nullable=False),  # the chosen, non-secret headers
    Column("body", LargeBinary, nullable=False),  # raw bytes, as signed
    Column("state", String(16), nullable=False),  # pending | done | ignored | dead
    Column("attempts", Integer, nullable=False, default=0),
    Column("next_attempt_at", Float, nullable=False, default=0.0),  # unix time
    Column("last_error", Text),
    Column("result", JSON),  # what processing made: versions, or why it was ignored
    Column("processed_at", String(32)),
    UniqueConstraint("source", "delivery_id", name="uq_inbox_delivery"),
)
Index("ix_inbox_due", inbox.c.state, inbox.c.next_attempt_at)
Index("ix_inbox_source_state", inbox.c.source, inbox.c.state)  # the console's counts: read from the index alone

batch_deployments = Table(  # scheduled or manual scoring of a dataset (batch.deployments, batch.scheduler)
    "batch_deployments", metadata,
    Column("name", String(64), primary_key=True),
    Column("model", String(64), nullable=False),
    Column("version", Integer),  # a fixed version, or NULL: what serves `environment` at run time
    Column("environment", String(32)),
    Column("input_uri", String(1024), nullable=False),
    Column("output_uri", String(1024), nullable=False),
    Column("format", String(16)),  # csv | parquet | jsonl; NULL: from the input's suffix
    Column("keys", JSON, nullable=False),  # key columns carried to the output
    Column("max_errors", Integer),
    Column("schedule", String(128), nullable=False),  # cron (5 or 6 fields), @hourly..@yearly, @once, manual
    Column("zone", String(64), nullable=False),  # IANA zone the schedule is read in (UTC by default)
    Column("catch_up", String(8), nullable=False),  # once | skip: occurrences missed while the service was down
    Column("paused", Boolean, nullable=False, default=False),
    Column("cursor", Float, nullable=False),  # unix time of the last occurrence handled (runs after it are due)
    Column("created_at", String(32), nullable=False),
    Column("updated_at", String(32), nullable=False),
)

batch_runs = Table(  # one row per run of a batch deployment: an occurrence is claimed once
    "batch_runs", metadata,
    Column("job_id", String(32), primary_key=True),  # the run's batch_prediction job
    Column("deployment", String(64), nullable=False),
    Column("occurrence", String(40), nullable=False),  # ISO UTC time of a scheduled one, "once", "manual:<job>"
    Column("trigger", String(16), nullable=False),  # schedule | once | manual
    Column("created_at", String(32), nullable=False),
    UniqueConstraint("deployment", "occurrence", name="uq_batch_runs_occurrence"),
)
Index("ix_batch_runs_deployment", batch_runs.c.deployment, batch_runs.c.created_at)

connections = Table(  # named SQL connections of batch datasets: the URL stays in an environment variable
    "connections", metadata,
    Column("name", String(64), primary_key=True),
    Column("url_env", String(128), nullable=False),  # the variable's name, never its value
    Column("created_at", String(32), nullable=False),
)

users = Table(  # named users, each with one role (access.ROLES); see users.py
    "users", metadata,
    Column("name", String(64), primary_key=True),
    Column("role", String(16), nullable=False),
    Column("created_at", String(32), nullable=False),
    Column("disabled", Boolean, nullable=False, default=False),  # a disabled user's tokens are refused
)

api_tokens = Table(  # a user's API tokens: only the SHA-256 of each is kept, never the token
    "api_tokens", metadata,
    Column("id", String(32), primary_key=True),  # t-<hex>
    Column("user", String(64), nullable=False),
    Column("name", String(64), nullable=False, default=""),  # the owner's label
    Column("token_hash", String(64), nullable=False),  # hex SHA-256 of the token
    Column("prefix", String(16), nullable=False),  # its first characters, to recognise it in a list
    Column("created_at", String(32), nullable=False),
    Column("last_used_at", String(32)),
    Column("revoked_at", String(32)),
    UniqueConstraint("token_hash", name="uq_api_tokens_hash"),
)
Index("ix_api_tokens_user", api_tokens.c.user)

meta = Table(
    "meta", metadata,
    Column("key", String(64), primary_key=True),
    Column("value", Integer, nullable=False),
    UniqueConstraint("key"),
)
