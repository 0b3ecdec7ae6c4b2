"""GitHub REST API client for release pipelines on GitHub Actions (``reference/integrations.md`` §5).

- ``repository_dispatch`` / ``workflow_dispatch`` start a run; the latter asks for
  ``return_run_details`` and so gets the run id back (200), or None from a server that
  answers the older 204.
- ``get_run``, ``find_run`` (by ``display_title``, for runs started without an id) and
  ``list_jobs`` follow it; ``run_outcome`` turns its jobs into modelcd's stage outcomes.
- ``create_pull_request`` proposes rendered pipeline files; an already open pull request
  for the same branch is returned instead of failing.
- ``create_deployment``, ``list_deployments`` and ``create_deployment_status`` show a
  release on the repository's Environments page (``reference/integrations.md`` §10):
  deployments are made with ``auto_merge: false`` and ``required_contexts: []``, so GitHub
  neither merges nor waits for checks.

Inputs are checked before anything is sent (GitHub's limits: ``event_type`` 1-100
characters, ``client_payload`` at most 10 top-level keys and under 64 KB, at most 25 inputs
and 65,535 characters, values sent as strings), raising InvalidInput naming the field.
Everything the API refuses is a ``PipelineApiError`` (see ``pipelines/http.py`` for the
retries); the token never appears in a message, a log line or a repr.
"""

from __future__ import annotations

import json
import logging
import re
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import requests

from modelcd.errors import InvalidInput
from modelcd.pipelines.http import (
    DEFAULT_BACKOFF,
    DEFAULT_MAX_WAIT,
    DEFAULT_RETRIES,
    DEFAULT_TIMEOUT,
    USER_AGENT,
    ApiClient,
    JsonHttp,
    Outcome,
    PipelineApiError,
    as_string,
    check_base_url,
    check_stage_map,
    compact_json,
    positive_id,
    segment,
    stage_result,
)

log = logging.getLogger(__name__)

API_URL = "https://api.github.com"
API_VERSION = "2022-11-28"
MAX_EVENT_TYPE = 100  # characters
MAX_PAYLOAD_KEYS = 10  # top-level keys of client_payload
MAX_PAYLOAD_BYTES = 64 * 1024  # client_payload must be smaller than this (compact JSON)
MAX_INPUTS = 25  # workflow_dispatch inputs (10 before December 2025)
MAX_INPUTS_CHARS = 65_535  # characters of all inputs together (as JSON)
RUNS_PAGE = 20
JOBS_PAGE = 100
MAX_PAGES = 10
ALREADY_EXISTS = "a pull request already exists"

_REPO = re.compile(r"^[A-Za-z0-9](?:[A-Za-z0-9-]{0,38})/[A-Za-z0-9._-]{1,100}$")
_WORKFLOW_FILE = re.compile(r"^[A-Za-z0-9._-]+\.ya?ml$")
_INPUT_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_-]*$")
_API_VERSION = re.compile(r"^\d{4}-\d{2}-\d{2}$")

HINTS = {
    401: "the token is missing, wrong or expired; give a valid token",
    403: "the token lacks a permission (fine-grained: Contents: write for repository_dispatch, Actions: write "
         "for workflow_dispatch, Actions: read to follow runs, Pull requests: write for pull requests), or a "
         "policy of the organisation blocks it",
    404: "the repository, workflow or run does not exist, or the token cannot see it (GitHub answers 404 for "
         "private repositories the token cannot read)",
    422: "GitHub refused the request as invalid (e.g. the workflow has no workflow_dispatch trigger on that ref, "
         "or an input the workflow does not declare)",
}

# a job's status/conclusion as a stage outcome
_JOB_STATUS: dict[str, Outcome] = {
    "queued": "pending", "waiting": "pending", "requested": "pending", "pending": "pending",
    "in_progress": "running",
}
DEPLOYMENT_STATES = ("error", "failure", "inactive", "in_progress", "queued", "pending", "success")
MAX_STATUS_DESCRIPTION = 140  # characters GitHub keeps of a deployment status's description
DEPLOYMENTS_PAGE = 100
DEPLOYMENT_HINTS = {
    202: "GitHub merged the default branch into the ref instead of creating a deployment (auto_merge); "
         "send the request again",
    403: "the token lacks Deployments: write (fine-grained) or repo_deployment (classic)",
    409: "a merge conflict, or a required status check is not successful on the ref",
    422: "GitHub refused the deployment as invalid (e.g. the ref does not exist)",
}

_CONCLUSION: dict[str, Outcome] = {
    "success": "succeeded", "neutral": "succeeded", "skipped": "skipped", "cancelled": "cancelled",
    "failure": "failed", "timed_out": "failed", "startup_failure": "failed", "stale": "failed",
    "action_required": "pending",
}


@dataclass(frozen=True)
class WorkflowRun:
    """A GitHub Actions workflow run. ``status`` is ``queued|in_progress|completed`` (also
    ``waiting|requested|pending``); ``conclusion`` is None until it completes, then
    ``success|failure|cancelled|timed_out|action_required|neutral|skipped``."""

    id: int
    status: str
    conclusion: str | None
    html_url: str
    display_title: str
    created_at: datetime | None
    event: str = ""
    head_branch: str | None = None

    @property
    def completed(self) -> bool:
        return self.status == "completed"


@dataclass(frozen=True)
class Job:
    """One job of a workflow run (``status`` and ``conclusion`` as for the run)."""

    id: int
    name: str
    status: str
    conclusion: str | None
    html_url: str = ""


@dataclass(frozen=True)
class GitHubDeployment:
    """A GitHub deployment: a request to deploy ``ref`` (``sha``) to ``environment``;
    ``payload`` is what it was created with (an object; GitHub echoes it back)."""

    id: int
    ref: str
    sha: str
    environment: str
    payload: dict[str, Any]
    created_at: datetime | None = None


def _deployment(doc: Any) -> GitHubDeployment:
    if not isinstance(doc, Mapping) or not isinstance(doc.get("id"), int) or isinstance(doc.get("id"), bool):
        raise ValueError("not a deployment")
    payload = doc.get("payload")
    if isinstance(payload, str):  # GitHub keeps a payload sent as a JSON string as a string
        try:
            payload = json.loads(payload) if payload else {}
        except ValueError:
            payload = {}
    return GitHubDeployment(id=doc["id"], ref=str(doc.get("ref") or ""), sha=str(doc.get("sha") or ""),
                            environment=str(doc.get("environment") or ""),
                            payload=dict(payload) if isinstance(payload, Mapping) else {},
                            created_at=_dt(doc.get("created_at")))


def _dt(value: Any) -> datetime | None:
    if not isinstance(value, str) or not value:
        return None
    try:
        return datetime.fromisoformat(value)
    except ValueError:
        return None


def _utc(value: datetime) -> datetime:
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


def _run(doc: Any) -> WorkflowRun:
    if not isinstance(doc, Mapping) or not isinstance(doc.get("id"), int):
        raise ValueError("not a workflow run")
    return WorkflowRun(id=doc["id"], status=str(doc.get("status") or ""), conclusion=doc.get("conclusion") or None,
                       html_url=str(doc.get("html_url") or ""), display_title=str(doc.get("display_title") or ""),
                       created_at=_dt(doc.get("created_at")), event=str(doc.get("event") or ""),
                       head_branch=doc.get("head_branch"))


def _job(doc: Any) -> Job:
    if not isinstance(doc, Mapping) or not isinstance(doc.get("id"), int):
        raise ValueError("not a job")
    return Job(id=doc["id"], name=str(doc.get("name") or ""), status=str(doc.get("status") or ""),
               conclusion=doc.get("conclusion") or None, html_url=str(doc.get("html_url") or ""))


class GitHubClient(ApiClient):
    """The GitHub REST API for one repository (``owner/name``), authenticated with a PAT or
    an App installation token. ``api_url`` is ``https://api.github.com`` or a GitHub
    Enterprise Server's ``https://<host>/api/v3``. ``timeout`` is per attempt; ``retries``
    the attempts after the first; ``max_wait`` caps a wait the server asks for."""

    def __init__(self, repo: str, token: str, api_url: str = API_URL, api_version: str = API_VERSION, *,
                 timeout: float = DEFAULT_TIMEOUT, retries: int = DEFAULT_RETRIES,
                 sleep: Callable[[float], None] = time.sleep, backoff: float = DEFAULT_BACKOFF,
                 max_wait: float = DEFAULT_MAX_WAIT, session: requests.Session | None = None) -> None:
        if not isinstance(repo, str) or not _REPO.match(repo):
            raise InvalidInput(f"repo: {repo!r} is not a GitHub repository; write it as owner/name", field="repo")
        if not isinstance(token, str) or not token.strip():
            raise InvalidInput("token: a GitHub token is required (fine-grained: Actions: write, Contents: write)",
                               field="token")
        if not isinstance(api_version, str) or not _API_VERSION.match(api_version):
            raise InvalidInput(f"api_version: {api_version!r} is not a GitHub API version like 2022-11-28",
                               field="api_version")
        self.repo = repo
        self.owner, self.name = repo.split("/", 1)
        self.api_version = api_version
        self._http = JsonHttp(
            check_base_url(api_url, "api_url"), service="GitHub API",
            headers={"Authorization": f"Bearer {token}", "Accept": "application/vnd.github+json",
                     "X-GitHub-Api-Version": api_version, "User-Agent": USER_AGENT},
            secrets=(token,), timeout=timeout, retries=retries, backoff=backoff, max_wait=max_wait, sleep=sleep,
            session=session, hints=HINTS)

    def __repr__(self) -> str:
        return f"GitHubClient({self.repo!r}, api_url={self._http.base_url!r})"

    @property
    def _repo_path(self) -> str:
        return f"/repos/{segment(self.owner)}/{segment(self.name)}"

    # ----------------------------------------------------------------------- starting runs

    def repository_dispatch(self, event_type: str, client_payload: Mapping[str, Any]) -> None:
        """Send a ``repository_dispatch`` event (204, no run id). It runs the workflows on the
        default branch with ``on: repository_dispatch: types: [<event_type>]``; find the run
        with ``find_run(..., event="repository_dispatch")``. Not re-sent after a timeout."""
        if not isinstance(event_type, str) or not 1 <= len(event_type) <= MAX_EVENT_TYPE:
            raise InvalidInput(f"event_type: must be 1 to {MAX_EVENT_TYPE} characters, got "
                               f"{len(event_type) if isinstance(event_type, str) else type(event_type).__name__}",
                               field="event_type")
        if not isinstance(client_payload, Mapping):
            raise InvalidInput("client_payload: must be a JSON object", field="client_payload")
        if len(client_payload) > MAX_PAYLOAD_KEYS:
            raise InvalidInput(f"client_payload: {len(client_payload)} top-level keys, GitHub accepts at most "
                               f"{MAX_PAYLOAD_KEYS}; nest the rest under one key", field="client_payload")
        if any(not isinstance(k, str) for k in client_payload):
            raise InvalidInput("client_payload: keys must be strings", field="client_payload")
        size = len(compact_json(client_payload, "client_payload"))
        if size >= MAX_PAYLOAD_BYTES:
            raise InvalidInput(f"client_payload: {size} bytes as JSON, GitHub accepts less than {MAX_PAYLOAD_BYTES} "
                               "(64 KB); send a reference instead of the data", field="client_payload")
        self._http.call("POST", f"{self._repo_path}/dispatches", what=f"send repository_dispatch {event_type!r}",
                        body={"event_type": event_type, "client_payload": dict(client_payload)}, ok=(204, 200))

    def workflow_dispatch(self, workflow: str | int, ref: str, inputs: Mapping[str, Any] | None = None) -> int | None:
        """Start ``workflow`` (its file name, e.g. ``release.yml``, or numeric id) on branch or
        tag ``ref`` with ``inputs`` (sent as strings; booleans as ``true``/``false``) and
        return the run id (200 with ``return_run_details``), or None when GitHub answers 204.

        A timeout is not retried (the run may have started): the PipelineApiError is
        ``ambiguous``; look for the run with ``find_run`` before sending it again."""
        wf = _workflow(workflow)
        if not isinstance(ref, str) or not ref.strip():
            raise InvalidInput("ref: give the branch or tag whose workflow declares workflow_dispatch", field="ref")
        values = _inputs(inputs or {})
        reply = self._http.call(
            "POST", f"{self._repo_path}/actions/workflows/{segment(wf)}/dispatches",
            what=f"start workflow {str(wf)!r} on {ref!r}",
            body={"ref": ref, "inputs": values, "return_run_details": True}, ok=(200, 204))
        if reply.status == 204:
            return None
        run_id = reply.body.get("workflow_run_id") if isinstance(reply.body, Mapping) else None
        if not isinstance(run_id, int) or isinstance(run_id, bool):
            raise self._bad_answer("POST", f"/actions/workflows/{segment(wf)}/dispatches",
                                   "run details (no workflow_run_id)")
        log.info("github %s: started workflow %s on %s: run %d", self.repo, wf, ref, run_id)
        return run_id

    # ----------------------------------------------------------------------- following runs

    def get_run(self, run_id: int) -> WorkflowRun:
        """The workflow run ``run_id`` as it is now."""
        rid = positive_id(run_id, "run_id")
        reply = self._http.call("GET", f"{self._repo_path}/actions/runs/{rid}", what=f"get workflow run {rid}")
        try:
            return _run(reply.body)
        except ValueError:
            raise self._bad_answer("GET", f"/actions/runs/{rid}", "a workflow run") from None

    def find_run(self, workflow: str | int, event: str, created_after: datetime, title_contains: str,
                 branch: str | None = None) -> WorkflowRun | None:
        """The newest run of ``workflow`` triggered by ``event`` (``workflow_dispatch`` or
        ``repository_dispatch``), created at or after ``created_after`` (naive means UTC),
        whose ``display_title`` contains ``title_contains`` (make it unique, e.g. with
        ``run-name: deploy ${{ inputs.correlation_id }}``); None when there is none yet."""
        wf = _workflow(workflow)
        if not isinstance(event, str) or not event.strip():
            raise InvalidInput("event: give the triggering event, e.g. workflow_dispatch", field="event")
        if not isinstance(title_contains, str) or not title_contains:
            raise InvalidInput("title_contains: give the unique part of the run's title, e.g. the correlation id",
                               field="title_contains")
        if not isinstance(created_after, datetime):
            raise InvalidInput("created_after: must be a datetime", field="created_after")
        since = _utc(created_after).replace(microsecond=0)
        params: dict[str, str | int] = {"event": event}
        if branch:
            params["branch"] = branch
        params.update({"created": ">=" + since.strftime("%Y-%m-%dT%H:%M:%SZ"), "per_page": RUNS_PAGE})
        path = f"{self._repo_path}/actions/workflows/{segment(wf)}/runs"
        found: list[WorkflowRun] = []
        for page in range(1, MAX_PAGES + 1):
            if page > 1:
                params["page"] = page
            reply = self._http.call("GET", path, params=params, what=f"list runs of workflow {str(wf)!r}")
            body = reply.body if isinstance(reply.body, Mapping) else {}
            docs = body.get("workflow_runs")
            if not isinstance(docs, list):
                raise self._bad_answer("GET", f"/actions/workflows/{segment(wf)}/runs", "a list of workflow runs")
            for doc in docs:
                try:
                    run = _run(doc)
                except ValueError:
                    continue
                if title_contains in run.display_title and (run.created_at is None or _utc(run.created_at) >= since):
                    found.append(run)
            total = body.get("total_count")
            if len(docs) < RUNS_PAGE or not isinstance(total, int) or page * RUNS_PAGE >= total:
                break
        if not found:
            return None
        if len(found) > 1:
            log.warning("github %s: %d runs of %s have %r in their title; using the newest", self.repo, len(found),
                        wf, title_contains)
        return max(found, key=lambda r: (r.created_at or since, r.id))

    def list_jobs(self, run_id: int) -> list[Job]:
        """The jobs of the latest attempt of run ``run_id``, in GitHub's order."""
        rid = positive_id(run_id, "run_id")
        path = f"{self._repo_path}/actions/runs/{rid}/jobs"
        jobs: list[Job] = []
        for page in range(1, MAX_PAGES + 1):
            params: dict[str, str | int] = {"per_page": JOBS_PAGE}
            if page > 1:
                params["page"] = page
            reply = self._http.call("GET", path, params=params, what=f"list jobs of workflow run {rid}")
            body = reply.body if isinstance(reply.body, Mapping) else {}
            docs = body.get("jobs")
            if not isinstance(docs, list):
                raise self._bad_answer("GET", f"/actions/runs/{rid}/jobs", "a list of jobs")
            try:
                jobs.extend(_job(d) for d in docs)
            except ValueError:
                raise self._bad_answer("GET", f"/actions/runs/{rid}/jobs", "a list of jobs") from None
            total = body.get("total_count")
            if len(docs) < JOBS_PAGE or not isinstance(total, int) or len(jobs) >= total:
                break
        return jobs

    # ----------------------------------------------------------------------- pull requests

    def create_pull_request(self, head: str, base: str, title: str, body: str = "") -> tuple[int, str]:
        """Open a pull request from branch ``head`` (``user:branch`` for a fork) into ``base``;
        returns its number and web URL. When one is already open for the same branches it is
        returned instead (so calling this again, or a retry, does not fail)."""
        for field, value in (("head", head), ("base", base), ("title", title)):
            if not isinstance(value, str) or not value.strip():
                raise InvalidInput(f"{field}: must be a non-empty string", field=field)
        if not isinstance(body, str):
            raise InvalidInput("body: must be a string", field="body")
        path = f"{self._repo_path}/pulls"
        try:
            reply = self._http.call("POST", path, what=f"open a pull request {head} -> {base}",
                                    body={"title": title, "head": head, "base": base, "body": body}, ok=(201,),
                                    idempotent=True)  # a repeat answers 422 "already exists", handled below
        except PipelineApiError as e:
            if e.status != 422 or ALREADY_EXISTS not in (e.service_message or "").lower():
                raise
            existing = self._open_pull_request(head, base)
            if existing is None:
                raise
            log.info("github %s: pull request #%d already open for %s -> %s", self.repo, existing[0], head, base)
            return existing
        pr = _pull(reply.body)
        if pr is None:
            raise self._bad_answer("POST", "/pulls", "a pull request", 201)
        log.info("github %s: opened pull request #%d (%s -> %s)", self.repo, pr[0], head, base)
        return pr

    def _open_pull_request(self, head: str, base: str) -> tuple[int, str] | None:
        qualified = head if ":" in head else f"{self.owner}:{head}"
        reply = self._http.call("GET", f"{self._repo_path}/pulls", what=f"find the open pull request {qualified}",
                                params={"head": qualified, "base": base, "state": "open"})
        docs = reply.body if isinstance(reply.body, list) else []
        return next((p for p in map(_pull, docs) if p is not None), None)

    # ----------------------------------------------------------------------- deployments

    def create_deployment(self, ref: str, environment: str, payload: Mapping[str, Any], description: str = "", *,
                          production_environment: bool | None = None) -> GitHubDeployment:
        """Create a deployment of ``ref`` (branch, tag or SHA) to ``environment`` carrying
        ``payload`` (an object, echoed in GitHub's ``deployment`` event): 201. Sent with
        ``auto_merge: false`` and ``required_contexts: []``. Not idempotent: a timeout is not
        re-sent (the PipelineApiError is ``ambiguous``); look for it with
        ``list_deployments`` by its payload before creating it again."""
        for field, value in (("ref", ref), ("environment", environment)):
            if not isinstance(value, str) or not value.strip():
                raise InvalidInput(f"{field}: must be a non-empty string", field=field)
        if not isinstance(payload, Mapping) or any(not isinstance(k, str) for k in payload):
            raise InvalidInput("payload: must be a JSON object with string keys", field="payload")
        body: dict[str, Any] = {"ref": ref, "task": "deploy", "auto_merge": False, "required_contexts": [],
                                "payload": dict(payload), "environment": environment,
                                "description": _description(description), "transient_environment": False}
        if production_environment is not None:
            body["production_environment"] = bool(production_environment)
        reply = self._http.call("POST", f"{self._repo_path}/deployments",
                                what=f"create a deployment of {ref!r} to {environment!r}", body=body, ok=(201,),
                                hints=DEPLOYMENT_HINTS)
        try:
            made = _deployment(reply.body)
        except ValueError:
            raise self._bad_answer("POST", "/deployments", "a deployment", 201) from None
        log.info("github %s: deployment %d of %s to %s", self.repo, made.id, ref, environment)
        return made

    def list_deployments(self, environment: str | None = None, ref: str | None = None,
                         task: str | None = None) -> list[GitHubDeployment]:
        """The repository's deployments (newest first), filtered by ``environment``, ``ref``
        and ``task``; at most ``MAX_PAGES`` pages of 100."""
        params: dict[str, str | int] = {k: v for k, v in (("environment", environment), ("ref", ref),
                                                          ("task", task)) if v}
        params["per_page"] = DEPLOYMENTS_PAGE
        found: list[GitHubDeployment] = []
        for page in range(1, MAX_PAGES + 1):
            if page > 1:
                params["page"] = page
            reply = self._http.call("GET", f"{self._repo_path}/deployments", params=params,
                                    what="list deployments")
            if not isinstance(reply.body, list):
                raise self._bad_answer("GET", "/deployments", "a list of deployments")
            try:
                found.extend(_deployment(d) for d in reply.body)
            except ValueError:
                raise self._bad_answer("GET", "/deployments", "a list of deployments") from None
            if len(reply.body) < DEPLOYMENTS_PAGE:
                break
        return found

    def create_deployment_status(self, deployment_id: int, state: str, description: str = "", *,
                                 environment_url: str | None = None, log_url: str | None = None,
                                 auto_inactive: bool | None = None) -> int:
        """Post ``state`` (``in_progress``, ``success``, ``failure``, ``inactive``… see
        ``DEPLOYMENT_STATES``) on deployment ``deployment_id`` and return the status's id.
        ``description`` is cut to 140 characters; ``log_url`` links the run. Posting the same
        status again only adds it to the history, so a retry after a timeout is safe."""
        did = positive_id(deployment_id, "deployment_id")
        if state not in DEPLOYMENT_STATES:
            raise InvalidInput(f"state: {state!r} is not a deployment state; use one of "
                               f"{', '.join(DEPLOYMENT_STATES)}", field="state")
        body: dict[str, Any] = {"state": state, "description": _description(description)}
        for field, url in (("environment_url", environment_url), ("log_url", log_url)):
            if url is not None:
                if not isinstance(url, str) or not url.startswith(("http://", "https://")):
                    raise InvalidInput(f"{field}: {url!r} is not an http(s) URL", field=field)
                body[field] = url
        if auto_inactive is not None:
            body["auto_inactive"] = bool(auto_inactive)
        reply = self._http.call("POST", f"{self._repo_path}/deployments/{did}/statuses",
                                what=f"set deployment {did} {state}", body=body, ok=(201,), idempotent=True,
                                hints=DEPLOYMENT_HINTS)
        status_id = reply.body.get("id") if isinstance(reply.body, Mapping) else None
        if not isinstance(status_id, int) or isinstance(status_id, bool):
            raise self._bad_answer("POST", f"/deployments/{did}/statuses", "a deployment status", 201)
        log.info("github %s: deployment %d %s", self.repo, did, state)
        return status_id

    def _bad_answer(self, method: str, subpath: str, expected: str, status: int = 200) -> PipelineApiError:
        path = self._http.base_path + self._repo_path + subpath
        return PipelineApiError(f"GitHub API: {method} {path} answered {status} but not with {expected}",
                                method=method, path=path, status=status, retryable=False)


def _pull(doc: Any) -> tuple[int, str] | None:
    if isinstance(doc, Mapping) and isinstance(doc.get("number"), int):
        return doc["number"], str(doc.get("html_url") or "")
    return None


def _description(text: str) -> str:
    if not isinstance(text, str):
        raise InvalidInput("description: must be a string", field="description")
    return text if len(text) <= MAX_STATUS_DESCRIPTION else text[:MAX_STATUS_DESCRIPTION - 1] + "…"


def _workflow(workflow: str | int) -> str | int:
    if isinstance(workflow, int) and not isinstance(workflow, bool) and workflow > 0:
        return workflow
    if isinstance(workflow, str) and (workflow.isdigit() or _WORKFLOW_FILE.match(workflow)):
        return int(workflow) if workflow.isdigit() else workflow
    raise InvalidInput(f"workflow: {workflow!r} is neither a workflow file name (release.yml) nor a numeric id",
                       field="workflow")


def _inputs(inputs: Mapping[str, Any]) -> dict[str, str]:
    if not isinstance(inputs, Mapping):
        raise InvalidInput("inputs: must be a mapping of input names to values", field="inputs")
    if len(inputs) > MAX_INPUTS:
        raise InvalidInput(f"inputs: {len(inputs)} inputs, GitHub accepts at most {MAX_INPUTS}; pass fewer (e.g. "
                           "one JSON string)", field="inputs")
    values: dict[str, str] = {}
    for name, value in inputs.items():
        if not isinstance(name, str) or not _INPUT_NAME.match(name):
            raise InvalidInput(f"inputs: {name!r} is not an input name (a letter or _, then letters, digits, - "
                               "or _)", field="inputs")
        values[name] = as_string(value, f"inputs.{name}")
    size = len(compact_json(values, "inputs").decode("utf-8"))
    if size > MAX_INPUTS_CHARS:
        raise InvalidInput(f"inputs: {size} characters, GitHub accepts at most {MAX_INPUTS_CHARS}; send a reference "
                           "instead of the data", field="inputs")
    return values


# --------------------------------------------------------------------------- stage outcomes


def job_outcome(job: Job) -> Outcome:
    """One job's status and conclusion as a stage outcome."""
    if job.status == "completed":
        return _CONCLUSION.get(job.conclusion or "", "failed")
    return _JOB_STATUS.get(job.status, "pending")


def _matches(job_name: str, wanted: str) -> bool:
    # "build", a matrix leg "build (3.11)", or a reusable workflow's job "build / image"
    return job_name == wanted or job_name.startswith((wanted + " (", wanted + " / "))


def run_outcome(run: WorkflowRun, jobs: Sequence[Job], stage_jobs: Mapping[str, str]) -> dict[str, Outcome]:
    """Each stage of ``stage_jobs`` (stage -> job name, e.g. ``{"build": "build", "smoke":
    "smoke-test"}``) with its outcome: ``pending|running|succeeded|failed|skipped|cancelled``.

    A stage is all jobs named so (matrix legs ``name (...)`` and reusable-workflow jobs
    ``name / ...`` included): failed if any failed, cancelled if any was cancelled, skipped
    if all were skipped, succeeded when all are done. Once the run has completed, a stage
    with no job was skipped (cancelled if the run was), and one still unfinished failed (or
    was cancelled with the run)."""
    check_stage_map(stage_jobs, "stage_jobs")
    cancelled = run.conclusion == "cancelled"
    out: dict[str, Outcome] = {}
    for stage, name in stage_jobs.items():
        out[stage] = stage_result([job_outcome(j) for j in jobs if _matches(j.name, name)], run.completed,
                                  cancelled)
    return out
