"""GitHub Deployments, a release observer (``releases.observers``): a release run by GitHub
Actions (``runner: github``) shows on the repository's Environments page
(``reference/integrations.md`` §10). On when ``MODELCD_GITHUB_DEPLOYMENTS`` is true; the
policy's pipeline credential then needs Deployments: write.

- The release starts (``building``): a deployment of ``pipeline.ref`` to the release's
  environment, with ``{"release_id", "model", "version"}`` as its payload, then ``in_progress``.
- It ends: ``success`` (with the endpoint's URL and the run's log), or ``failure``. On success
  the model's other successful deployments of that environment become ``inactive``: one is
  live per model, and after a rollback it is the version that serves again.
- An instant rollback (``rolled_back``): the deployment of the release that serves again gets
  ``success`` once more, the model's others ``inactive``.

Each release's GitHub deployment id is kept in ``github_deployments``, so a redelivered event
never creates a second one; its creation is claimed first (one handler creates it), and a
claim left by a crash is taken over after ``CLAIM_STALE_S``, finding the deployment by its
payload before creating it. The last status posted is kept too: a repeated or late event
never posts a status twice, nor ``in_progress`` after the end."""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from sqlalchemy import select, update

from modelcd.pipelines.github import GitHubClient
from modelcd.pipelines.providers import resolve_credential
from modelcd.releases.rollback_event import ROLLED_BACK
from modelcd.store import schema
from modelcd.store.db import now

if TYPE_CHECKING:
    from modelcd.context import Context
    from modelcd.releases.observers import ReleaseMoved
    from modelcd.releases.policy import PipelineSpec
    from modelcd.releases.service import Release

log = logging.getLogger(__name__)

RUNNER = "github"
START = "building"  # the phase whose event creates the deployment
STATUS_OF = {START: "in_progress", "succeeded": "success", "failed": "failure", "cancelled": "failure",
             ROLLED_BACK: "success"}
CLAIM_STALE_S = 120.0
table = schema.github_deployments


def should_post(current: str | None, wanted: str, reviving: bool = False) -> bool:
    """Whether to post ``wanted`` on a deployment whose last status is ``current``: never the
    same twice, never back to ``in_progress``; an ``inactive`` one is ``success`` again only
    when a rollback makes it serve again (``reviving``)."""
    if wanted == current:
        return False
    if current in (None, "in_progress"):
        return True
    if current == "success":
        return wanted == "inactive"
    return current == "inactive" and wanted == "success" and reviving


def describe(moved: ReleaseMoved) -> str:
    """The status's description (GitHub keeps 140 characters)."""
    what = f"{moved.model} v{moved.version}"
    if moved.phase == ROLLED_BACK:
        return f"{what} serves again (rollback)"
    if moved.phase == START:
        return f"{what}: release {moved.release_id} started"
    text = f"{what}: release {moved.release_id} {moved.phase}"
    return f"{text}: {moved.error}" if moved.error and moved.phase != "succeeded" else text


def observe(ctx: Context, moved: ReleaseMoved) -> None:
    """The observer: quiet unless the setting is on and the release is run by GitHub."""
    if not ctx.settings.github_deployments or moved.runner != RUNNER or moved.phase not in STATUS_OF:
        return
    if not moved.release_id:
        return
    release = ctx.releases.get(moved.release_id)
    spec = release.policy.pipeline
    if spec is None or not spec.repo:
        return
    with _client(ctx, spec) as client:
        if moved.phase == ROLLED_BACK:
            _serving_again(ctx, client, release, spec, moved)
            return
        dep_id = _deployment_id(ctx, client, release, spec, create=moved.phase == START)
        if dep_id is None:
            return
        wanted = STATUS_OF[moved.phase]
        if should_post(_state(ctx, release.id), wanted):
            _post(ctx, client, release.id, dep_id, wanted, describe(moved), _urls(ctx, release, wanted))
        if wanted == "success":
            _others_inactive(ctx, client, release, spec.repo or "")


def _client(ctx: Context, spec: PipelineSpec) -> GitHubClient:
    return GitHubClient(spec.repo or "", resolve_credential(spec, ctx.home), api_url=spec.api_url)


def _row(ctx: Context, release_id: str) -> Any:
    with ctx.db.read() as conn:
        return conn.execute(select(table).where(table.c.release_id == release_id)).first()


def _state(ctx: Context, release_id: str) -> str | None:
    row = _row(ctx, release_id)
    return row.state if row is not None else None


def _claim(ctx: Context, release: Release, repo: str) -> bool:
    """Take the creation of the release's deployment: True for the one handler that may create it."""
    ts = time.time()
    with ctx.db.write() as conn:
        row = conn.execute(select(table).where(table.c.release_id == release.id)).first()
        if row is None:
            conn.execute(table.insert().values(release_id=release.id, repo=repo, model=release.model,
                                               environment=release.environment, claimed_at=ts, updated_at=now()))
            return True
        if row.deployment_id is not None or ts - row.claimed_at < CLAIM_STALE_S:
            return False
        taken = conn.execute(update(table).where(table.c.release_id == release.id,
                                                 table.c.claimed_at == row.claimed_at)
                             .values(claimed_at=ts, updated_at=now()))
        return taken.rowcount == 1


def _deployment_id(ctx: Context, client: GitHubClient, release: Release, spec: PipelineSpec,
                   create: bool) -> int | None:
    """The release's GitHub deployment, made when ``create`` (or finishing a creation a crash
    left claimed); None when there is none, or another handler is making it right now."""
    row = _row(ctx, release.id)
    if row is not None and row.deployment_id is not None:
        return int(row.deployment_id)
    if (row is None and not create) or not _claim(ctx, release, spec.repo or ""):
        return None
    found = None
    if row is not None:  # a crash may have come after GitHub made it
        found = next((d for d in client.list_deployments(environment=release.environment, ref=spec.ref)
                      if d.payload.get("release_id") == release.id), None)
    made = found or client.create_deployment(
        spec.ref, release.environment, {"release_id": release.id, "model": release.model,
                                        "version": str(release.version)},
        f"modelcd release {release.id}: {release.model} v{release.version}")
    with ctx.db.write() as conn:
        conn.execute(update(table).where(table.c.release_id == release.id)
                     .values(deployment_id=made.id, updated_at=now()))
    return made.id


def _post(ctx: Context, client: GitHubClient, release_id: str, dep_id: int, state: str, description: str,
          urls: dict[str, str]) -> None:
    client.create_deployment_status(dep_id, state, description, auto_inactive=False, **urls)
    with ctx.db.write() as conn:
        conn.execute(update(table).where(table.c.release_id == release_id).values(state=state, updated_at=now()))


def run_page(api_url: str, repo: str, run_id: str) -> str | None:
    """The web page of a workflow run, from the API's URL (github.com or a GitHub Enterprise
    Server's ``https://host/api/v3``); None for any other API address."""
    parts = urlsplit(api_url)
    path = parts.path.rstrip("/")
    if parts.hostname == "api.github.com":
        base = "https://github.com"
    elif path.endswith("/api/v3"):
        base = f"{parts.scheme}://{parts.netloc}{path[:-len('/api/v3')]}"
    else:
        return None
    return f"{base}/{repo}/actions/runs/{run_id}"


def _urls(ctx: Context, release: Release, state: str) -> dict[str, str]:
    """The run's page as the log, and on success the endpoint as the environment's URL."""
    urls: dict[str, str] = {}
    run = ctx.pipeline_runs.get(release.id)
    spec = release.policy.pipeline
    page = run.url if run is not None else None
    if run is not None and not page and run.run_id and spec is not None:
        page = run_page(spec.api_url, spec.repo or "", run.run_id)
    if page and page.startswith(("http://", "https://")):
        urls["log_url"] = page
    if state == "success":
        urls["environment_url"] = ctx.router.endpoint_uri(release.model, release.environment)
    return urls


def _others_inactive(ctx: Context, client: GitHubClient, release: Release, repo: str) -> None:
    """Mark the model's other successful deployments of the environment inactive."""
    with ctx.db.read() as conn:
        rows = conn.execute(select(table).where(
            table.c.repo == repo, table.c.model == release.model, table.c.environment == release.environment,
            table.c.state == "success", table.c.release_id != release.id, table.c.deployment_id.is_not(None))).all()
    for row in rows:
        _post(ctx, client, row.release_id, int(row.deployment_id), "inactive",
              f"{release.model}: replaced by release {release.id}", {})


def _serving_again(ctx: Context, client: GitHubClient, release: Release, spec: PipelineSpec,
                   moved: ReleaseMoved) -> None:
    row = _row(ctx, release.id)
    if row is None or row.deployment_id is None:
        return  # the release that serves again never had a GitHub deployment
    if should_post(row.state, "success", reviving=True):
        _post(ctx, client, release.id, int(row.deployment_id), "success", describe(moved),
              _urls(ctx, release, "success"))
    _others_inactive(ctx, client, release, spec.repo or "")
