"""The ``modelcd`` command line: parse, call the service's REST API, print. ``--json`` on
every listing and show command prints the API's JSON as is."""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import click

from modelcd.client import GATE_PHASE, TERMINAL_PHASES, Client, api_path
from modelcd.config import Settings, load_settings
from modelcd.errors import ModelcdError


class Obj:
    def __init__(self) -> None:
        self._settings: Settings | None = None

    @property
    def settings(self) -> Settings:
        if self._settings is None:
            try:
                self._settings = load_settings()
            except ModelcdError as e:
                raise click.ClickException(e.message) from None
        return self._settings

    @property
    def client(self) -> Client:
        return Client(self.settings)


pass_obj = click.make_pass_decorator(Obj, ensure=True)


def _out(data: Any) -> None:
    click.echo(json.dumps(data, indent=2, default=str))


def _table(rows: list[dict[str, Any]], cols: list[str]) -> None:
    if not rows:
        click.echo("(none)")
        return
    widths = {c: max(len(c), *(len(str(r.get(c, ""))) for r in rows)) for c in cols}
    click.echo("  ".join(c.upper().ljust(widths[c]) for c in cols))
    for r in rows:
        click.echo("  ".join(str(r.get(c, "") if r.get(c) is not None else "").ljust(widths[c]) for c in cols))


def _fail(e: ModelcdError) -> click.ClickException:
    where = f" [{e.field}]" if e.field else ""
    return click.ClickException(f"{e.message}{where}")


class Group(click.Group):
    """Turns modelcd errors into one clean line and a non-zero exit."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except ModelcdError as e:
            raise _fail(e) from None


@click.group(cls=Group)
@click.version_option(package_name="modelcd")
def main() -> None:
    """modelcd: continuous deployment for machine-learning models."""


@main.command()
@click.option("--host", help="address to listen on (MODELCD_HOST, default 127.0.0.1)")
@click.option("--port", type=int, help="port to listen on (MODELCD_PORT, default 8600)")
def serve(host: str | None, port: int | None) -> None:
    """Run the control plane: API, dispatcher, runner, data-plane supervisor."""
    from modelcd.serve import serve as run

    try:
        settings = load_settings({"host": host, "port": port})
        run(settings, click.echo)
    except ModelcdError as e:
        raise _fail(e) from None


def _read_json_file(path: str | None, field: str) -> Any:
    if path is None:
        return None
    try:
        return json.loads(Path(path).read_text())
    except OSError as e:
        raise click.BadParameter(f"cannot read {path}: {e.strerror}", param_hint=f"--{field}") from None
    except ValueError as e:
        raise click.BadParameter(f"{path} is not valid JSON: {e}", param_hint=f"--{field}") from None


def _parse_tags(tags: tuple[str, ...]) -> dict[str, str]:
    out = {}
    for t in tags:
        if "=" not in t:
            raise click.BadOptionUsage("tag", f"--tag {t!r}: expected KEY=VALUE, e.g. --tag stage=candidate")
        k, v = t.split("=", 1)
        out[k] = v
    return out


def _progress(rel: dict[str, Any]) -> None:
    line = f"  {time.strftime('%H:%M:%S')}  release {rel['id']}: {rel['phase']}"
    if rel.get("error") and rel["phase"] in TERMINAL_PHASES:
        line += f" — {rel['error']}"
    click.echo(line)


def _wait(client: Client, release_id: str) -> dict[str, Any]:
    rel = client.wait_release(release_id, _progress)
    if rel["phase"] == GATE_PHASE:
        click.echo(f"release {release_id} passed its smoke checks and waits for a person: "
                   f"`modelcd releases approve {release_id}` (or reject)")
        return rel
    if rel["phase"] != "succeeded":
        raise click.ClickException(f"release {release_id} {rel['phase']}: {rel.get('error') or ''} "
                                   f"(see `modelcd releases show {release_id}`)")
    return rel


@main.command()
@click.argument("name")
@click.argument("path", type=click.Path(exists=True, path_type=Path))
@click.option("--flavor", help="sklearn, onnx, pyfunc (an MLflow model) or custom (detected when omitted)")
@click.option("--requirements", "requirements", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="requirements.txt (default: the one among the files)")
@click.option("--sample", type=click.Path(exists=True, dir_okay=False), help="JSON input sample")
@click.option("--expected", type=click.Path(exists=True, dir_okay=False), help="JSON expected output")
@click.option("--tag", "tags", multiple=True, help="KEY=VALUE, repeatable")
@click.option("--description", default="", help="free text")
@click.option("--training-data", "training_data", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="training data (CSV with a header row, Parquet or JSON lines): its statistics are computed and "
                   "stored with the version")
@click.option("--wait", is_flag=True, help="wait for the release; exit non-zero if it fails")
@click.option("--json", "as_json", is_flag=True)
@pass_obj
def register(obj: Obj, name: str, path: Path, flavor: str | None, requirements: Path | None, sample: str | None,
             expected: str | None, tags: tuple[str, ...], description: str, training_data: Path | None, wait: bool,
             as_json: bool) -> None:
    """Register PATH (a file or a folder) as a new version of model NAME."""
    meta: dict[str, Any] = {"tags": _parse_tags(tags), "description": description}
    if flavor:
        meta["flavor"] = flavor
    if requirements:
        meta["requirements"] = requirements.read_text()
    if sample:
        meta["sample"] = _read_json_file(sample, "sample")
    if expected:
        meta["expected"] = _read_json_file(expected, "expected")
    client = obj.client
    version = client.register(name, path, meta)
    if training_data is not None:
        job = _statistics_upload(client, name, version["version"], training_data, wait, as_json)
        version = {**version, "statistics_job": job["id"]}
    if as_json and not wait:
        _out(version)
        return
    click.echo(f"registered {name} v{version['version']} ({version['flavor']}, digest {version['digest'][:12]})")
    if not wait:
        return
    if client.get(api_path("models", name)).get("archived"):
        click.echo(f"no release started: model {name} is archived (`modelcd models unarchive {name}`, then promote)")
        return
    rel = client.find_release(name, version["version"])
    if rel is None:
        click.echo("no release started (the matching policy has auto: false); promote it by hand")
        return
    rel = _wait(client, rel["id"])
    if rel["phase"] == GATE_PHASE:
        if as_json:
            _out({"version": version, "release": rel, "endpoint": None})
        return
    ep = client.get(api_path("endpoints", name, rel['environment']))
    click.echo(f"{name} v{version['version']} serves {rel['environment']}: {ep['scoring_uri']}")
    if as_json:
        _out({"version": version, "release": rel, "endpoint": ep})


@main.group(invoke_without_command=True)
@click.option("--json", "as_json", is_flag=True)
@click.pass_context
def models(ctx: click.Context, as_json: bool) -> None:
    """List models (or: show, archive, unarchive)."""
    if ctx.invoked_subcommand is None:
        data = ctx.ensure_object(Obj).client.get("/api/v1/models")
        rows = [{**m, "state": "archived" if m.get("archived_at") else "active"} for m in data["models"]]
        _out(data) if as_json else _table(rows, ["name", "latest_version", "versions", "state", "created_at"])


@models.command("show")
@click.argument("name")
@click.option("--json", "as_json", is_flag=True)
@pass_obj
def models_show(obj: Obj, name: str, as_json: bool) -> None:
    """Show model NAME: versions, and whether it is archived."""
    m = obj.client.get(api_path("models", name))
    if as_json:
        _out(m)
        return
    click.echo(f"model:    {m['name']}\nversions: {m['latest_version'] or 0} (latest)\ncreated:  {m['created_at']}")
    if m.get("archived"):
        click.echo(f"archived: since {m['archived_at']} (job {m['archive_job']}): versions are recorded, no release "
                   f"starts; `modelcd models unarchive {name}`")
        for note in m.get("skipped_releases", []):
            click.echo(f"  skipped: {note}")


def _print_job(job: dict[str, Any]) -> None:
    click.echo(f"job {job['id']} ({job['type']}): {job['state']}" + (f" — {job['error']}" if job["error"] else ""))
    for line in job.get("log", []):
        click.echo(f"  {line}")


@models.command("archive")
@click.argument("name")
@click.option("--json", "as_json", is_flag=True)
@pass_obj
def models_archive(obj: Obj, name: str, as_json: bool) -> None:
    """Stop new releases of NAME: versions are still recorded, none is released (refused while a
    release of it runs; queued ones are cancelled). What serves keeps serving."""
    job = obj.client.post(api_path("models", name, "archive"))
    _out(job) if as_json else _print_job(job)


@models.command("unarchive")
@click.argument("name")
@click.option("--json", "as_json", is_flag=True)
@pass_obj
def models_unarchive(obj: Obj, name: str, as_json: bool) -> None:
    """Let releases of NAME start again (versions recorded meanwhile are promoted by hand)."""
    job = obj.client.post(api_path("models", name, "unarchive"))
    _out(job) if as_json else _print_job(job)


@main.command()
@click.argument("args", nargs=-1, required=True, metavar="NAME | show NAME VERSION")
@click.option("--json", "as_json", is_flag=True)
@pass_obj
def versions(obj: Obj, args: tuple[str, ...], as_json: bool) -> None:
    """List the versions of model NAME; `versions show NAME VERSION` shows one with its latest evaluations."""
    if (len(args) == 3 and args[0] == "show") or len(args) == 2:
        name, number = args[-2:]
        if not number.isdigit():
            raise click.BadParameter(f"{number!r} is not a version number", param_hint="VERSION")
        _version_show(obj.client, name, int(number), as_json)
        return
    if len(args) != 1:
        raise click.UsageError("give NAME to list the versions, or show NAME VERSION")
    data = obj.client.get(api_path("models", args[0], "versions"))
    rows = [{**v, "digest": v["digest"][:12]} for v in data["versions"]]
    _out(data) if as_json else _table(rows, ["model", "version", "flavor", "digest", "source", "created_at"])


def _version_show(client: Client, name: str, number: int, as_json: bool) -> None:
    v = client.get(api_path("models", name, "versions", number))
    if as_json:
        _out(v)
        return
    click.echo(f"{v['model']} v{v['version']}: {v['flavor']}, digest {v['digest'][:12]}, source {v['source']}, "
               f"{v['status']}, created {v['created_at']}")
    if v.get("description"):
        click.echo(f"  {v['description']}")
    if v.get("tags"):
        click.echo("  tags: " + ", ".join(f"{k}={t}" for k, t in v["tags"].items()))
    if v.get("metrics"):
        click.echo("  metrics: " + ", ".join(f"{k} {m:g}" for k, m in v["metrics"].items()))
    evaluations = v.get("evaluations") or []
    click.echo("evaluations:" if evaluations else f"evaluations: none (`modelcd evaluate {name} {number} --data URI "
                                                   "--label COLUMN`)")
    for e in evaluations:
        click.echo(f"  {e['created_at']}  {_evaluation_line(e)} (job {e['job_id']})")


@main.command()
@click.argument("name")
@click.argument("version", type=int)
@click.option("--data", "data", required=True,
              help="the labelled data: a local path (read by the service), s3://bucket/prefix/, "
                   "sql://CONNECTION/TABLE, or a table name / SELECT with --connection")
@click.option("--label", required=True, help="the column holding the true values (not given to the model)")
@click.option("--metrics", help="comma-separated: accuracy,f1,precision,recall,roc_auc or rmse,mae,r2 (default: "
                                "from the label's type)")
@click.option("--connection", help="a named SQL connection: --data is then a table name or a SELECT query")
@click.option("--format", "fmt", type=click.Choice(["csv", "parquet", "jsonl"]),
              help="the data's format (default: from its suffix)")
@click.option("--max-errors", type=int, default=0, show_default=True,
              help="rows the model may fail to score (left out of the metrics)")
@click.option("--wait", is_flag=True, help="wait for the job and print the metrics; exit 1 when it does not succeed")
@click.option("--json", "as_json", is_flag=True)
@pass_obj
def evaluate(obj: Obj, name: str, version: int, data: str, label: str, metrics: str | None,
             connection: str | None, fmt: str | None, max_errors: int, wait: bool, as_json: bool) -> None:
    """Evaluate version VERSION of model NAME on labelled data (an `evaluate` job): scored in the
    version's own environment, the metrics stored with the version."""
    client = obj.client
    body: dict[str, Any] = {"data": data, "label": label, "max_errors": max_errors}
    body.update({k: v for k, v in (("metrics", metrics), ("connection", connection), ("format", fmt)) if v})
    job = client.post(api_path("models", name, "versions", version, "evaluations"), json=body)
    if not wait:
        _out(job) if as_json else click.echo(f"evaluation job {job['id']}: {job['state']} (follow it with "
                                              f"`modelcd jobs logs {job['id']} -f`)")
        return
    job = client.wait_job(job["id"], timeout_s=24 * 3600)
    stored = [e for e in client.get(api_path("models", name, "versions", version, "evaluations"))["evaluations"]
              if e["job_id"] == job["id"]]
    if as_json:
        _out({"job": job, "evaluation": stored[0] if stored else None})
    elif stored:
        _print_evaluation(stored[0])
    else:
        click.echo(f"job {job['id']} (evaluate): {job['state']}" + (f" — {job['error']}" if job.get("error") else ""))
    if job["state"] != "succeeded":
        sys.exit(1)


def _evaluation_line(e: dict[str, Any]) -> str:
    from modelcd.jobs.evaluation import evaluation_line

    return evaluation_line(e)


def _print_evaluation(e: dict[str, Any]) -> None:
    click.echo(f"{e['model']} v{e['version']}: {_evaluation_line(e)}")
    click.echo(f"  data digest {e.get('data_digest') or '-'}; rows read {e['rows_read']}, scored {e['rows_scored']}, "
               f"errors {e['errors']}, unlabelled {e['unlabelled']}; job {e['job_id']}")
    matrix = e.get("confusion_matrix")
    if matrix:
        labels = [str(x) for x in matrix["labels"]]
        width = max(6, *(len(x) for x in labels), *(len(str(n)) for row in matrix["matrix"] for n in row))
        click.echo("  confusion matrix (rows: true, columns: predicted):")
        click.echo("    " + " " * width + "  " + "  ".join(x.rjust(width) for x in labels))
        for label, row in zip(labels, matrix["matrix"], strict=True):
            click.echo("    " + label.rjust(width) + "  " + "  ".join(str(n).rjust(width) for n in row))
    residuals = e.get("residuals")
    if residuals:
        quantiles = ", ".join(f"q{q} {v:.4g}" for q, v in residuals["quantiles"].items())
        click.echo(f"  residuals: mean {residuals['mean']:.4g}, std {residuals['std']:.4g}, "
                   f"min {residuals['min']:.4g}, max {residuals['max']:.4g}; {quantiles}")


def _statistics_upload(client: Client, name: str, version: int, data: Path, wait: bool,
                       quiet: bool) -> dict[str, Any]:
    """Upload training data for the version; with ``wait``, wait for its statistics job (a
    failed one stops the command, naming the cause)."""
    job = client.upload_statistics(name, version, data)
    if not quiet:
        click.echo(f"statistics job {job['id']}: computing the statistics of {data.name} for {name} v{version}")
    if not wait:
        return job
    job = client.wait_job(job["id"])
    if job["state"] != "succeeded":
        raise click.ClickException(f"statistics job {job['id']} {job['state']}: {job.get('error') or ''} (the "
                                   f"version is registered; fix the data and run `modelcd statistics {name} "
                                   f"{version} --training-data FILE`)")
    if not quiet:
        stored = client.get(api_path("models", name, "versions", version, "statistics"))
        click.echo(f"statistics of {name} v{version}: {stored['rows']} rows, {stored['features']} features")
    return job


@main.command()
@click.argument("name")
@click.argument("version", type=int)
@click.option("--training-data", "training_data", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="compute them (again) from this file: CSV with a header row, Parquet or JSON lines")
@click.option("--wait/--no-wait", default=True, show_default=True, help="with --training-data: wait for the job")
@click.option("--json", "as_json", is_flag=True)
@pass_obj
def statistics(obj: Obj, name: str, version: int, training_data: Path | None, wait: bool, as_json: bool) -> None:
    """Show the training-data statistics of version VERSION of model NAME, or compute them
    from --training-data (a `statistics` job)."""
    from modelcd.jobs.statistics import feature_line

    client = obj.client
    if training_data is not None:
        job = _statistics_upload(client, name, version, training_data, wait, as_json)
        if not wait:
            if as_json:
                _out(job)
            return
    stored = client.get(api_path("models", name, "versions", version, "statistics"))
    if as_json:
        _out(stored)
        return
    click.echo(f"{name} v{version}: {stored['rows']} rows, {stored['features']} features from {stored['source']} "
               f"(job {stored['job_id']}, {stored['created_at']})")
    for feature in stored["statistics"]["features"]:
        click.echo("  " + feature_line(feature))


@main.group()
def releases() -> None:
    """Releases: list, show, plan, stop, approve, reject."""


@releases.command("list")
@click.option("--model")
@click.option("--env", "environment")
@click.option("--json", "as_json", is_flag=True)
@pass_obj
def releases_list(obj: Obj, model: str | None, environment: str | None, as_json: bool) -> None:
    data = obj.client.get("/api/v1/releases", params={"model": model, "environment": environment})
    cols = ["id", "model", "version", "environment", "phase", "trigger", "created_at"]
    _out(data) if as_json else _table(data["releases"], cols)


@releases.command("show")
@click.argument("release_id")
@click.option("--json", "as_json", is_flag=True)
@pass_obj
def releases_show(obj: Obj, release_id: str, as_json: bool) -> None:
    rel = obj.client.get(api_path("releases", release_id))
    if as_json:
        _out(rel)
        return
    click.echo(f"release {rel['id']}: {rel['model']} v{rel['version']} → {rel['environment']}  [{rel['phase']}]")
    if rel.get("error"):
        click.echo(f"error: {rel['error']}")
    if rel.get("image_digest"):
        click.echo(f"image: {rel['image']} ({rel['image_digest']})")
    for step in rel.get("analysis") or []:  # what the candidate predicted, judged (shadow, mirrored canary)
        click.echo(f"analysis {step['step']}: {step['outcome']} — {step['summary']}")
        for check in step.get("checks") or []:
            click.echo(f"  {check['name']}: {check['outcome']} — {check['message']}")
    _table(rel["jobs"], ["id", "type", "state", "runs_in", "started_at", "finished_at", "error"])
    click.echo("events:")
    for ev in rel["events"]:
        click.echo(f"  {ev['ts']}  {ev['kind']:<24} {_actor(ev):<12} {ev['message']}")


def _actor(event: dict[str, Any]) -> str:
    """Who caused an event: the user, or ``modelcd`` for the engine itself."""
    return str(event.get("actor") or "modelcd")


@releases.command("stop")
@click.argument("release_id")
@click.option("--json", "as_json", is_flag=True)
@pass_obj
def releases_stop(obj: Obj, release_id: str, as_json: bool) -> None:
    rel = obj.client.post(api_path("releases", release_id, "stop"))
    _out(rel) if as_json else click.echo(f"stop requested for release {release_id} ({rel['phase']})")


@releases.command("plan")
@click.argument("name")
@click.argument("version", type=int)
@click.option("--env", "environment", default=None, help="plan a promote to this environment (default: what "
              "registering does, the policy's whole chain)")
@click.option("--json", "as_json", is_flag=True)
@pass_obj
def releases_plan(obj: Obj, name: str, version: int, environment: str | None, as_json: bool) -> None:
    """What releasing NAME vVERSION would do, changing nothing: policy and why, environments,
    strategy, gates, artifact (already built?), what retires, what a rollback returns to."""
    from modelcd.releases.plan_text import release_plan_lines

    plan = obj.client.get(api_path("models", name, "versions", version, "plan"),
                          params={"environment": environment} if environment else None)
    _out(plan) if as_json else click.echo("\n".join(release_plan_lines(plan)))


@releases.command("approve")
@click.argument("release_id")
@click.option("--comment", default="", help="why (kept in the release's events)")
@click.option("--json", "as_json", is_flag=True)
@pass_obj
def releases_approve(obj: Obj, release_id: str, comment: str, as_json: bool) -> None:
    """Let a release waiting at its approval gate move traffic."""
    _answer_gate(obj, release_id, "approve", comment, as_json)


@releases.command("reject")
@click.argument("release_id")
@click.option("--comment", default="", help="why (kept in the release's events)")
@click.option("--json", "as_json", is_flag=True)
@pass_obj
def releases_reject(obj: Obj, release_id: str, comment: str, as_json: bool) -> None:
    """Refuse a release waiting at its approval gate: it rolls back, production untouched."""
    _answer_gate(obj, release_id, "reject", comment, as_json)


def _answer_gate(obj: Obj, release_id: str, verb: str, comment: str, as_json: bool) -> None:
    rel = obj.client.post(api_path("releases", release_id, verb), json={"comment": comment})
    if as_json:
        _out(rel)
        return
    done = {"approve": "approved", "reject": "rejected"}[verb]
    click.echo(f"{done} release {release_id}: {rel['model']} v{rel['version']} → {rel['environment']} "
               f"({rel['phase']})")


@main.group()
def jobs() -> None:
    """Jobs: list, show (with events), logs, stop."""


@jobs.command("list")
@click.option("--release", "release_id")
@click.option("--json", "as_json", is_flag=True)
@pass_obj
def jobs_list(obj: Obj, release_id: str | None, as_json: bool) -> None:
    data = obj.client.get("/api/v1/jobs", params={"release_id": release_id})
    _out(data) if as_json else _table(data["jobs"], ["id", "type", "state", "release_id", "model", "version",
                                                       "created_at"])


@jobs.command("show")
@click.argument("job_id")
@click.option("--json", "as_json", is_flag=True)
@pass_obj
def jobs_show(obj: Obj, job_id: str, as_json: bool) -> None:
    job = obj.client.get(api_path("jobs", job_id))
    if as_json:
        _out(job)
        return
    click.echo(f"job {job['id']} ({job['type']}): {job['state']}" + (f" — {job['error']}" if job["error"] else ""))
    for ev in job["events"]:
        click.echo(f"  {ev['ts']}  {ev['kind']:<20} {_actor(ev):<12} {ev['message']}")


@jobs.command("logs")
@click.argument("job_id")
@click.option("--follow", "-f", is_flag=True, help="keep printing until the job ends")
@pass_obj
def jobs_logs(obj: Obj, job_id: str, follow: bool) -> None:
    client, after = obj.client, 0
    while True:
        for line in client.get(api_path("jobs", job_id, "logs"), params={"after": after})["logs"]:
            click.echo(line["line"])
            after = line["id"]
        if not follow or client.get(api_path("jobs", job_id))["state"] in ("succeeded", "failed", "cancelled"):
            return
        time.sleep(0.5)


@jobs.command("stop")
@click.argument("job_id")
@pass_obj
def jobs_stop(obj: Obj, job_id: str) -> None:
    obj.client.post(api_path("jobs", job_id, "stop"))
    click.echo(f"stop requested for job {job_id}")


@main.group()
def endpoints() -> None:
    """Endpoints: stable scoring URIs and their traffic."""


@endpoints.command("list")
@click.option("--json", "as_json", is_flag=True)
@pass_obj
def endpoints_list(obj: Obj, as_json: bool) -> None:
    data = obj.client.get("/api/v1/endpoints")
    rows = [{**e, "traffic": json.dumps(e["traffic"])} for e in data["endpoints"]]
    _out(data) if as_json else _table(rows, ["model", "environment", "state", "traffic", "scoring_uri"])


@endpoints.command("show")
@click.argument("name")
@click.option("--env", "environment", required=True)
@click.option("--json", "as_json", is_flag=True)
@pass_obj
def endpoints_show(obj: Obj, name: str, environment: str, as_json: bool) -> None:
    ep = obj.client.get(api_path("endpoints", name, environment))
    if as_json:
        _out(ep)
        return
    click.echo(f"uri:      {ep['uri']}\nscoring:  {ep['scoring_uri']}\ntraffic:  {json.dumps(ep['traffic'])}")
    if ep.get("retired_at"):
        click.echo(f"retired:  {ep['retired_at']} (the router answers 410; a release serves it again)")


@endpoints.command("retire")
@click.argument("name")
@click.option("--env", "environment", required=True)
@click.option("--json", "as_json", is_flag=True)
@pass_obj
def endpoints_retire(obj: Obj, name: str, environment: str, as_json: bool) -> None:
    """Drain NAME's endpoint in ENV: traffic to zero (the router answers 410), then its deployments
    stop; records and keys are kept. Refused while a release of it runs (queued ones are cancelled).
    A later `modelcd promote` serves it again."""
    job = obj.client.post(api_path("endpoints", name, environment, "retire"), timeout=300)
    _out(job) if as_json else _print_job(job)


@endpoints.command("keys")
@click.argument("name")
@click.option("--env", "environment", required=True)
@click.option("--regenerate", type=click.Choice(["primary", "secondary"]),
              help="make a new key for this slot; the other keeps working")
@click.option("--json", "as_json", is_flag=True)
@pass_obj
def endpoints_keys(obj: Obj, name: str, environment: str, regenerate: str | None, as_json: bool) -> None:
    """The endpoint's scoring keys (Authorization: Bearer KEY). Shown once: when they are made
    (the first time you ask) and when one is regenerated; only their hashes are kept."""
    body = {"regenerate": regenerate} if regenerate else {}
    keys = obj.client.post(api_path("endpoints", name, environment, "keys"), json=body)
    if as_json:
        _out(keys)
        return
    for slot in ("primary", "secondary"):
        shown = keys.get(slot)
        click.echo(f"{slot + ':':<11}{shown if shown else '(hidden: shown once when it was made)'}")
    if keys.get("auth") == "none":
        click.echo(f"note: {name}/{environment} has auth: none in its policy, so the router does not ask for a key")
    if keys.get("note"):
        click.echo(keys["note"])


@main.command()
@click.option("--model")
@click.option("--env", "environment")
@click.option("--live", is_flag=True, help="only live deployments")
@click.option("--json", "as_json", is_flag=True)
@pass_obj
def deployments(obj: Obj, model: str | None, environment: str | None, live: bool, as_json: bool) -> None:
    """List deployments."""
    data = obj.client.get("/api/v1/deployments", params={"model": model, "environment": environment,
                                                          "live": "1" if live else None})
    if as_json:
        _out(data)
        return
    rows = [{**d, "state": f"{d['state']} (asleep)" if d.get("sleeping") else d["state"]} for d in data["deployments"]]
    _table(rows, ["id", "model", "version", "environment", "state", "url", "pid"])


# -- stages: one command per stage, for pipelines (--release) and people ---------------------


def _stage_client(obj: Obj) -> Client:
    """The API client; inside a pipeline run, the per-release token (MODELCD_RELEASE_TOKEN)."""
    client = obj.client
    release_token = os.environ.get("MODELCD_RELEASE_TOKEN")
    if release_token:
        client.token = release_token
    return client


def _find_release(client: Client, name: str, version: int, environment: str) -> str:
    rels = client.get("/api/v1/releases", params={"model": name, "environment": environment})["releases"]
    for rel in rels:
        if rel["version"] == version and rel["phase"] not in TERMINAL_PHASES:
            return str(rel["id"])
    raise click.ClickException(f"no release of {name} v{version} → {environment} in progress; start one with "
                               f"`modelcd promote {name} {version} --env {environment}`")


def _run_stage(obj: Obj, stage: str, release_id: str | None, name: str | None, version: int | None,
               environment: str, as_json: bool) -> None:
    client = _stage_client(obj)
    if release_id is None:
        if name is None or version is None:
            raise click.UsageError("give --release ID, or MODEL VERSION [--env ENV]")
        release_id = _find_release(client, name, version, environment)
    from modelcd.releases.policy import RUNNER_STAGES

    result = _stage_here(obj, client, release_id, stage, as_json) if stage in RUNNER_STAGES else None
    if result is None:
        path = api_path("releases", release_id, "stages", stage)
        result = client.post(path, params={"wait": 20}, timeout=90)
        while result["outcome"] == "running":  # a long stage: ask again (each answer within ~20 s)
            if not as_json:
                click.echo(f"{stage} running…", err=True)
            result = client.get(path, params={"wait": 20}, timeout=90)
    if stage == "rollback" and result.get("runner_deployment"):
        from modelcd.pipelines.runner_stages import stop_runner_deployment

        try:
            stop_runner_deployment(obj.settings, result["deployment_id"], result["runner_deployment"],
                                   lambda line: click.echo(line, err=as_json))
        except ModelcdError as e:
            click.echo(f"could not stop the release's container on this engine: {e.message}", err=True)
            raise SystemExit(1) from None
    if as_json:
        _out(result)
    else:
        note = " (already done)" if result["already"] else ""
        click.echo(f"{stage} {result['outcome']}{note}: release {release_id} is {result['phase']}"
                   + (f" — {result['error']}" if result.get("error") and result["outcome"] != "succeeded" else ""))
        if stage == "build" and result.get("image_digest"):
            click.echo(f"image {result['image']} ({result['image_digest']})")
    if result["outcome"] == "failed":
        raise SystemExit(1)


def _stage_here(obj: Obj, client: Client, release_id: str, stage: str, as_json: bool) -> dict[str, Any] | None:
    """Do the stage in this process when the policy puts it in the pipeline's runner
    (``pipeline.stages``); None when the service runs it."""
    began = client.post(api_path("releases", release_id, "stages", stage, "begin"), timeout=90)
    if began["run_in"] != "runner":
        return None
    if "job_id" not in began:  # done (or failed) before: a CI retry
        return dict(began)
    from modelcd.pipelines.runner_stages import run

    return run(client, obj.settings, began, lambda line: click.echo(line, err=as_json))


def _stage_command(stage: str, help_text: str) -> None:
    @main.command(stage, help=help_text)
    @click.argument("name", required=False)
    @click.argument("version", type=int, required=False)
    @click.option("--release", "release_id", default=None, help="release id (what a pipeline passes)")
    @click.option("--env", "environment", default="production", show_default=True)
    @click.option("--json", "as_json", is_flag=True, help="print the result as JSON")
    @pass_obj
    def command(obj: Obj, name: str | None, version: int | None, release_id: str | None, environment: str,
                as_json: bool) -> None:
        _run_stage(obj, stage, release_id, name, version, environment, as_json)


_stage_command("build", "Run the build stage of a release: bundle or image (exit 1 when it fails).")
_stage_command("deploy", "Run the deploy stage of a release: start the new deployment beside production.")
_stage_command("smoke", "Run the smoke stage of a release against the new deployment's own URI.")


@main.command()
@click.argument("name", required=False)
@click.argument("version", type=int, required=False)
@click.option("--env", "environment", default="production", show_default=True)
@click.option("--release", "release_id", default=None, help="run the promote stage of this release (pipelines)")
@click.option("--wait/--no-wait", default=True, show_default=True)
@click.option("--json", "as_json", is_flag=True, help="print the result as JSON (with --release)")
@pass_obj
def promote(obj: Obj, name: str | None, version: int | None, environment: str, release_id: str | None, wait: bool,
            as_json: bool) -> None:
    """Release VERSION of NAME to an environment (build, deploy, smoke, then traffic), or with
    --release ID run that release's promote stage (traffic moves to its deployment)."""
    if release_id is not None:
        _run_stage(obj, "promote", release_id, None, None, environment, as_json)
        return
    if name is None or version is None:
        raise click.UsageError("give MODEL VERSION [--env ENV], or --release ID")
    client = obj.client
    rel = client.post(api_path("endpoints", name, environment, "promote"), json={"version": version})
    click.echo(f"release {rel['id']} queued: {name} v{version} → {environment}")
    if wait and _wait(client, rel["id"])["phase"] != GATE_PHASE:
        click.echo(json.dumps(client.get(api_path("endpoints", name, environment))["traffic"]))


@main.command()
@click.argument("name", required=False)
@click.option("--env", "environment", default="production", show_default=True)
@click.option("--release", "release_id", default=None, help="roll back this release (its pipeline's rollback job)")
@click.option("--wait/--no-wait", default=True, show_default=True)
@click.option("--json", "as_json", is_flag=True, help="print the result as JSON (with --release)")
@pass_obj
def rollback(obj: Obj, name: str | None, environment: str, release_id: str | None, wait: bool, as_json: bool) -> None:
    """Send NAME's endpoint in ENV back to its previous version, or with --release ID undo
    what that release started (traffic back, its deployment stopped)."""
    if release_id is not None:
        _run_stage(obj, "rollback", release_id, None, None, environment, as_json)
        return
    if name is None:
        raise click.UsageError("give MODEL [--env ENV], or --release ID")
    client = obj.client
    result = client.post(api_path("endpoints", name, environment, "rollback"))
    if result["release_id"]:
        click.echo(f"previous deployment was retired; release {result['release_id']} redeploys it")
        if wait:
            _wait(client, result["release_id"])
    ep = client.get(api_path("endpoints", name, environment))
    click.echo(f"{name}/{environment} traffic: {json.dumps(ep['traffic'])}")


@main.command()
@click.option("--release", "release_id", required=True, help="release id")
@click.option("--stage", required=True, type=click.Choice(["build", "deploy", "smoke", "promote", "rollback",
                                                            "pipeline"]))
@click.option("--outcome", required=True, type=click.Choice(["succeeded", "failed", "cancelled"]))
@click.option("--message", default="", help="one line for the release's events")
@click.option("--json", "as_json", is_flag=True)
@pass_obj
def report(obj: Obj, release_id: str, stage: str, outcome: str, message: str, as_json: bool) -> None:
    """Tell the service a stage's outcome from a pipeline (uses MODELCD_RELEASE_TOKEN there)."""
    rel = _stage_client(obj).post(api_path("releases", release_id, "report"),
                                  json={"stage": stage, "outcome": outcome, "message": message})
    if as_json:
        _out(rel)
    else:
        click.echo(f"reported {stage} {outcome}: release {release_id} is {rel['phase']}")


@main.group()
def policies() -> None:
    """Release policies: list, show, apply, validate, delete."""


@policies.command("list")
@click.option("--json", "as_json", is_flag=True)
@pass_obj
def policies_list(obj: Obj, as_json: bool) -> None:
    data = obj.client.get("/api/v1/policies")
    _out(data) if as_json else _table(data["policies"], ["name", "revision", "updated_at"])


@policies.command("show")
@click.argument("name")
@pass_obj
def policies_show(obj: Obj, name: str) -> None:
    _out(obj.client.get(api_path("policies", name)))


@policies.command("validate")
@click.argument("file", type=click.Path(exists=True, dir_okay=False, path_type=Path))
def policies_validate(file: Path) -> None:
    """Check a policy file locally; errors give the YAML path and line."""
    from modelcd.releases.policy import parse_policy

    try:
        policy = parse_policy(file.read_text(), str(file))
    except ModelcdError as e:
        raise click.ClickException(e.message) from None
    click.echo(f"{file}: policy {policy.name} is valid (revision {policy.revision})")


@policies.command("apply")
@click.argument("file", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--plan", "plan", is_flag=True, help="store nothing: show which current versions would change and how")
@click.option("--json", "as_json", is_flag=True, help="with --plan: print the plan as JSON")
@pass_obj
def policies_apply(obj: Obj, file: Path, plan: bool, as_json: bool) -> None:
    if plan:
        from modelcd.releases.plan_text import policy_plan_lines

        answer = obj.client.post("/api/v1/policies/plan", data=file.read_text().encode(),
                                 headers={"Content-Type": "application/yaml"})
        _out(answer) if as_json else click.echo("\n".join(policy_plan_lines(answer)))
        return
    result = obj.client.request("PUT", "/api/v1/policies", data=file.read_text().encode(),
                                headers={"Content-Type": "application/yaml"})
    click.echo(f"policy {result['name']} stored (revision {result['revision']})")


@policies.command("delete")
@click.argument("name")
@pass_obj
def policies_delete(obj: Obj, name: str) -> None:
    obj.client.request("DELETE", api_path("policies", name))
    click.echo(f"policy {name} deleted")


@main.group()
def sources() -> None:
    """External model registries that tell modelcd about new versions."""


@sources.command("connect")
@click.argument("kind", type=click.Choice(["mlflow"]))
@click.option("--tracking-uri", required=True, help="the MLflow tracking server, e.g. http://127.0.0.1:5000")
@click.option("--url", "public_url", help="where MLflow reaches modelcd (default: MODELCD_URL)")
@pass_obj
def sources_connect(obj: Obj, kind: str, tracking_uri: str, public_url: str | None) -> None:
    """Create (or update) the webhook on the registry, with a new secret kept in $MODELCD_HOME/settings.yaml;
    a running service does it and uses them at once."""
    client = obj.client
    if client.healthy():
        done = client.post(api_path("sources", "mlflow", "connect"),
                           json={"tracking_uri": tracking_uri, "url": public_url or obj.settings.url}, timeout=120)
        live = f"the service at {client.base} uses them now"
    else:
        from modelcd.sources.connect import connect_mlflow

        done = connect_mlflow(obj.settings, tracking_uri, public_url).to_dict()
        live = "`modelcd serve` reads them when it starts"
    click.echo(f"MLflow webhook {done['webhook_id']} at {done['tracking_uri']} now posts model_version.created to "
               f"{done['hook_url']}")
    click.echo(f"secret and tracking URI saved in {done['settings_path']} (mode 0600); {live}")
    for key in done.get("overridden") or ():
        click.echo(f"note: MODELCD_{key.upper()} (environment or MODELCD_CONFIG) overrides the saved {key}")


@main.group()
def inbox() -> None:
    """Webhook deliveries: list, show, retry (dead letters)."""


@inbox.command("list")
@click.option("--state", type=click.Choice(["pending", "done", "ignored", "dead"]))
@click.option("--source")
@click.option("--json", "as_json", is_flag=True)
@pass_obj
def inbox_list(obj: Obj, state: str | None, source: str | None, as_json: bool) -> None:
    data = obj.client.get("/api/v1/inbox", params={"state": state, "source": source})
    _out(data) if as_json else _table(data["deliveries"], ["id", "source", "delivery_id", "state", "attempts",
                                                            "received_at", "last_error"])


@inbox.command("show")
@click.argument("delivery", type=int)
@pass_obj
def inbox_show(obj: Obj, delivery: int) -> None:
    _out(obj.client.get(api_path("inbox", delivery)))


@inbox.command("retry")
@click.argument("delivery", type=int)
@pass_obj
def inbox_retry(obj: Obj, delivery: int) -> None:
    d = obj.client.post(api_path("inbox", delivery, "retry"))
    click.echo(f"delivery {delivery} ({d['source']} {d['delivery_id']}) queued again")


@main.group()
def pipelines() -> None:
    """Release pipelines as code: render, check, publish to the model's repository."""


def _pipeline_options(environment: str, runs_on: str, package: str, callback_url: str | None,
                      registry_secrets: str, settings: Settings) -> Any:
    from modelcd.pipelines.render import PipelineOptions

    username, _, password = registry_secrets.partition(",")
    if not username.strip() or not password.strip():
        raise click.BadParameter("give two secret names, USERNAME,PASSWORD (e.g. the policy's "
                                 "pipeline.registry_username_env and registry_password_env)",
                                 param_hint="--registry-secrets")
    return PipelineOptions(environment=environment, runs_on=runs_on, package=package,
                           callback_url=callback_url or settings.url, registry_username_env=username.strip(),
                           registry_password_env=password.strip())


_PIPELINE_OPTIONS = [
    click.option("--provider", type=click.Choice(["github", "azure"]), required=True),
    click.option("--environment", default="production", show_default=True, help="default environment input"),
    click.option("--runs-on", default="ubuntu-latest", show_default=True, help="GitHub runner label"),
    click.option("--package", default="modelcd", show_default=True, help="what the pipeline pip-installs"),
    click.option("--callback-url", default=None, help="Azure: default callback_url parameter (default MODELCD_URL)"),
    click.option("--registry-secrets", default="MODELCD_REGISTRY_USERNAME,MODELCD_REGISTRY_PASSWORD",
                 show_default=True, metavar="USERNAME,PASSWORD",
                 help="the CI secrets that build and deploy get as environment variables of the same names "
                      "(the policy's pipeline.registry_username_env / registry_password_env)"),
]


def _with_pipeline_options(fn: Any) -> Any:
    for option in reversed(_PIPELINE_OPTIONS):
        fn = option(fn)
    return fn


@pipelines.command("render")
@click.argument("model")
@_with_pipeline_options
@click.option("--out", "out_dir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="write under this repository root instead of printing")
@click.option("--check", "check", is_flag=True, help="validate with actionlint and the JSON schemas")
@pass_obj
def pipelines_render(obj: Obj, model: str, provider: str, environment: str, runs_on: str, package: str,
                     callback_url: str | None, registry_secrets: str, out_dir: Path | None, check: bool) -> None:
    """Render MODEL's release pipeline for --provider github|azure."""
    from modelcd.pipelines.check import check_pipeline
    from modelcd.pipelines.render import render_pipeline

    rendered = render_pipeline(model, provider, _pipeline_options(environment, runs_on, package, callback_url,
                                                                  registry_secrets, obj.settings))
    if check:
        problems = check_pipeline(rendered)
        if problems:
            raise click.ClickException(f"{rendered.path} does not pass its checks:\n" + "\n".join(problems))
    if out_dir is None:
        click.echo(rendered.text, nl=False)
        if check:
            click.echo(f"# {rendered.path}: actionlint and schema checks passed", err=True)
        return
    path = out_dir / rendered.path
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(rendered.text)
    click.echo(f"wrote {path}" + (" (checks passed)" if check else ""))


@pipelines.command("publish")
@click.argument("model")
@_with_pipeline_options
@click.option("--repo", "repo_url", required=True, help="the model's git repository (path, file:// or https://)")
@click.option("--branch", default="main", show_default=True, help="branch to commit on")
@click.option("--base-branch", default="main", show_default=True, help="where a new branch starts")
@click.option("--token-env", default=None, help="https: environment variable holding the git token")
@click.option("--pull-request", "github_repo", default=None, metavar="OWNER/NAME",
              help="then open a pull request --branch → --base-branch on this GitHub repository")
@click.option("--github-api-url", default="https://api.github.com", show_default=True)
@click.option("--github-token-env", default=None, help="environment variable with the GitHub API token "
              "(default: --token-env)")
@pass_obj
def pipelines_publish(obj: Obj, model: str, provider: str, environment: str, runs_on: str, package: str,
                      callback_url: str | None, registry_secrets: str, repo_url: str, branch: str, base_branch: str,
                      token_env: str | None, github_repo: str | None, github_api_url: str,
                      github_token_env: str | None) -> None:
    """Render, check and commit MODEL's release pipeline into its repository, then push.
    Nothing is committed when the file is already up to date. With --pull-request, a pull
    request is opened (or the open one found) with the token of --token-env."""
    from modelcd.pipelines.check import check_pipeline
    from modelcd.pipelines.git import RepoTarget, publish
    from modelcd.pipelines.render import render_pipeline

    rendered = render_pipeline(model, provider, _pipeline_options(environment, runs_on, package, callback_url,
                                                                  registry_secrets, obj.settings))
    problems = check_pipeline(rendered)
    if problems:
        raise click.ClickException(f"{rendered.path} does not pass its checks:\n" + "\n".join(problems))
    token = os.environ.get(token_env) if token_env else None
    target = RepoTarget(url=repo_url, branch=branch, base_branch=base_branch, token=token)
    result = publish(target, {rendered.path: rendered.text},
                     f"modelcd: release pipeline for {model} ({provider})", obj.settings.home / "repos", click.echo)
    click.echo(f"{rendered.path}: " + (f"committed {result.commit[:12]} on {result.branch}" if result.commit
                                        else f"already up to date on {result.branch}"))
    if github_repo and branch != base_branch:
        from modelcd.pipelines.github import GitHubClient

        api_token = os.environ.get(github_token_env) if github_token_env else token
        if not api_token:
            raise click.UsageError("--pull-request needs --github-token-env (or --token-env) naming a variable that "
                                   "holds a GitHub token")
        with GitHubClient(github_repo, api_token, api_url=github_api_url) as gh:
            number, url = gh.create_pull_request(branch, base_branch, f"modelcd: release pipeline for {model}",
                                                 f"Rendered by `modelcd pipelines publish {model} --provider "
                                                 f"{provider}` from pipeline_templates/.")
        click.echo(f"pull request #{number}: {url}")


@main.group("base-image")
def base_image() -> None:
    """Base images for scoring images (docker target)."""


@base_image.command("build")
@click.option("--tag", default=None, help="image tag (default modelcd/python:3.11-bookworm)")
@click.option("--suite", default="bookworm", show_default=True, help="Debian suite")
@click.option("--mirror", default=None, help="Debian mirror URL (default: mmdebstrap's, or the host's apt sources)")
@click.option("--include", "include", multiple=True, help="extra Debian package (repeatable), e.g. libgomp1")
@pass_obj
def base_image_build(obj: Obj, tag: str | None, suite: str, mirror: str | None, include: tuple[str, ...]) -> None:
    """Build a Python base image offline from Debian packages (mmdebstrap | docker import).

    Use it where images cannot be pulled: set docker_base_image (MODELCD_DOCKER_BASE_IMAGE)
    to the tag it prints."""
    import threading

    from modelcd.builders.base_image import build_base_image, default_tag

    tag = tag or default_tag(suite)
    build_base_image(tag, suite, mirror, obj.settings.docker_host, click.echo, threading.Event(), tuple(include))
    click.echo(f"base image ready: {tag}\nuse it with: export MODELCD_DOCKER_BASE_IMAGE={tag}")


@main.group("images")
def images() -> None:
    """Scoring images on the Docker engine (docker target)."""


@images.command("prune")
@click.option("--dry-run", is_flag=True, help="say what would go; remove nothing")
@click.option("--json", "as_json", is_flag=True)
@pass_obj
def images_prune(obj: Obj, dry_run: bool, as_json: bool) -> None:
    """Remove the scoring images of versions nothing needs: no deployment that is not stopped, not
    named by an endpoint's traffic, previous traffic (rollback) or shadow copies, no queued or
    running release; then the dependencies images no image left uses. A version released again
    is rebuilt from cached wheels and layers."""
    job = obj.client.post("/api/v1/images/prune", json={"dry_run": dry_run}, timeout=600)
    _out(job) if as_json else _print_job(job)


@main.command()
@pass_obj
def shutdown(obj: Obj) -> None:
    """Stop this home's data plane: the router and every process deployment. A running
    service is asked to do it (it then leaves them down until it restarts)."""
    client = obj.client
    if client.healthy():
        for line in client.post(api_path("data-plane", "stop"), timeout=180)["stopped"]:
            click.echo(line)
        click.echo(f"the service at {client.base} keeps running without a data plane until it restarts")
        return
    if _home_in_use(obj.settings.home):
        raise click.ClickException(f"a modelcd service works on {obj.settings.home} but does not answer at "
                                   f"{client.base}, and it would start the router again: point MODELCD_URL at it "
                                   "(then shutdown asks it), or stop it first")
    from modelcd.lifecycle import stop_data_plane

    running = _router_address(obj.settings.home)
    for line in stop_data_plane(obj.settings):
        if line.startswith("stopped router on "):
            line = f"stopped router on {running}" if running else "no router was running"
        click.echo(line)


def _home_in_use(home: Path) -> bool:
    """Whether a `modelcd serve` holds this home's serve lock."""
    import fcntl

    from modelcd.serve import SERVE_LOCK

    path = home / SERVE_LOCK
    if not path.is_file():
        return False
    with open(path, "rb") as f:
        try:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        fcntl.flock(f.fileno(), fcntl.LOCK_UN)
    return False


def _router_address(home: Path) -> str | None:
    """Where the router recorded in this home listens, from its own command line (which may
    differ from this shell's settings)."""
    try:
        pid = int((home / "router" / "router.pid").read_text())
        args = Path(f"/proc/{pid}/cmdline").read_bytes().decode("utf-8", "replace").split("\0")
        if "modelcd.routing.proxy" in args:
            return f"http://{args[args.index('--host') + 1]}:{args[args.index('--port') + 1]}"
    except (OSError, ValueError, IndexError):
        pass
    return None


@main.group()
def batch() -> None:
    """Batch deployments: a model scoring a dataset on a schedule or when asked; each run is a job."""


def _batch_row(d: dict[str, Any]) -> dict[str, Any]:
    serves = f"v{d['version']}" if d.get("version") is not None else f"env {d.get('environment')}"
    zone = "" if d.get("zone") in (None, "UTC") else f" ({d['zone']})"
    return {**d, "serves": serves, "schedule": f"{d['schedule']}{zone}",
            "state": "paused" if d.get("paused") else "active", "next_run_at": d.get("next_run_at") or "-"}


def _print_run(client: Client, job: dict[str, Any]) -> None:
    click.echo(f"job {job['id']} ({job['type']}): {job['state']}" + (f" — {job['error']}" if job.get("error") else ""))
    for entry in client.get(api_path("jobs", job["id"], "logs"))["logs"]:
        click.echo(f"  {entry['line']}")


@batch.command("create")
@click.argument("name")
@click.option("--model", required=True, help="the registered model")
@click.option("--version", type=int, help="a fixed version (or --env)")
@click.option("--env", "environment", help="score with whatever version serves this environment at run time")
@click.option("--input", "input_uri", required=True, help="the dataset: a file, folder or URI")
@click.option("--output", "output_uri", required=True, help="where the predictions go: a file, folder or URI")
@click.option("--schedule", default="manual", show_default=True,
              help="cron (5 fields, or 6: the sixth is seconds), @hourly, @daily, @weekly, @monthly, @yearly, "
                   "@once (one run now) or manual")
@click.option("--zone", default="UTC", show_default=True, help="IANA time zone the schedule is read in")
@click.option("--format", "fmt", type=click.Choice(["csv", "parquet", "jsonl"]),
              help="the input's format (default: from its suffix)")
@click.option("--key", "keys", multiple=True, help="a key column carried to the output, repeatable")
@click.option("--max-errors", type=int, help="fail the run after this many bad rows (default: never)")
@click.option("--catch-up", type=click.Choice(["once", "skip"]), default="once", show_default=True,
              help="after downtime: run the missed occurrence once, or skip it")
@click.option("--json", "as_json", is_flag=True)
@pass_obj
def batch_create(obj: Obj, name: str, model: str, version: int | None, environment: str | None, input_uri: str,
                 output_uri: str, schedule: str, zone: str, fmt: str | None, keys: tuple[str, ...],
                 max_errors: int | None, catch_up: str, as_json: bool) -> None:
    """Create batch deployment NAME."""
    body = {"name": name, "model": model, "version": version, "environment": environment, "input": input_uri,
            "output": output_uri, "schedule": schedule, "zone": zone, "format": fmt, "keys": list(keys),
            "max_errors": max_errors, "catch_up": catch_up}
    d = obj.client.post("/api/v1/batch", json=body)
    if as_json:
        _out(d)
        return
    row = _batch_row(d)
    click.echo(f"batch deployment {d['name']}: {d['model']} {row['serves']}, {d['input']} → {d['output']}, "
               f"schedule {row['schedule']}, next run {row['next_run_at']}")


@batch.command("list")
@click.option("--json", "as_json", is_flag=True)
@pass_obj
def batch_list(obj: Obj, as_json: bool) -> None:
    data = obj.client.get("/api/v1/batch")
    _out(data) if as_json else _table([_batch_row(d) for d in data["batch"]],
                                      ["name", "model", "serves", "schedule", "state", "next_run_at"])


@batch.command("show")
@click.argument("name")
@click.option("--json", "as_json", is_flag=True)
@pass_obj
def batch_show(obj: Obj, name: str, as_json: bool) -> None:
    d = obj.client.get(api_path("batch", name))
    if as_json:
        _out(d)
        return
    row = _batch_row(d)
    click.echo(f"{d['name']}: {d['model']} {row['serves']}, {row['state']}")
    click.echo(f"  input {d['input']}, output {d['output']}" + (f", format {d['format']}" if d["format"] else "")
               + (f", keys {', '.join(d['keys'])}" if d["keys"] else "")
               + (f", max errors {d['max_errors']}" if d["max_errors"] is not None else ""))
    click.echo(f"  schedule {row['schedule']}, catch-up {d['catch_up']}, next run {row['next_run_at']}")
    _table([{**r, "id": r["job_id"]} for r in d["runs"]], ["id", "trigger", "occurrence", "state", "version",
                                                          "started_at", "finished_at"])


@batch.command("run")
@click.argument("name")
@click.option("--wait", is_flag=True, help="wait for the run; exit 1 when it does not succeed")
@click.option("--json", "as_json", is_flag=True)
@pass_obj
def batch_run(obj: Obj, name: str, wait: bool, as_json: bool) -> None:
    """Run batch deployment NAME now (a batch_prediction job)."""
    client = obj.client
    job = client.post(api_path("batch", name, "run"))
    if wait:
        job = client.wait_job(job["id"], timeout_s=24 * 3600)
    if as_json:
        _out(job)
    elif wait:
        _print_run(client, job)
    else:
        click.echo(f"job {job['id']}: {job['state']} (follow it with `modelcd jobs logs {job['id']} -f`)")
    if wait and job["state"] != "succeeded":
        sys.exit(1)


def _batch_verb(obj: Obj, name: str, verb: str, as_json: bool) -> None:
    d = obj.client.post(api_path("batch", name, verb))
    _out(d) if as_json else click.echo(f"batch deployment {name}: {'paused' if d['paused'] else 'active'}")


@batch.command("pause")
@click.argument("name")
@click.option("--json", "as_json", is_flag=True)
@pass_obj
def batch_pause(obj: Obj, name: str, as_json: bool) -> None:
    """Pause NAME's schedule (a run in progress goes on; `modelcd jobs stop` stops it)."""
    _batch_verb(obj, name, "pause", as_json)


@batch.command("resume")
@click.argument("name")
@click.option("--json", "as_json", is_flag=True)
@pass_obj
def batch_resume(obj: Obj, name: str, as_json: bool) -> None:
    """Resume NAME's schedule from now (what fell due while paused does not run)."""
    _batch_verb(obj, name, "resume", as_json)


@batch.command("delete")
@click.argument("name")
@pass_obj
def batch_delete(obj: Obj, name: str) -> None:
    """Delete NAME (refused while a run is in progress; its jobs stay listed)."""
    obj.client.request("DELETE", api_path("batch", name))
    click.echo(f"deleted batch deployment {name}")


@main.command()
@click.option("--exit", "exit_after", is_flag=True, help="stop everything after the tour")
@pass_obj
def quickstart(obj: Obj, exit_after: bool) -> None:
    """Start the service, release two versions of a small sklearn model, show the switch."""
    from modelcd.quickstart import run

    sys.exit(run(obj.settings, exit_after))


if __name__ == "__main__":
    main()


@main.group()
def connections() -> None:
    """Named SQL connections for batch datasets (sql://NAME/TABLE): the URL stays in an environment variable."""


@connections.command("add")
@click.argument("name")
@click.option("--url-env", required=True, help="the name of the service's environment variable holding the "
              "SQLAlchemy URL (never the URL itself)")
@click.option("--json", "as_json", is_flag=True)
@pass_obj
def connections_add(obj: Obj, name: str, url_env: str, as_json: bool) -> None:
    """Add connection NAME, its URL read from $VAR by the service when a batch run uses it."""
    c = obj.client.post("/api/v1/connections", json={"name": name, "url_env": url_env})
    if as_json:
        _out(c)
        return
    note = "" if c["url_set"] else f" (${c['url_env']} is not set in the service's environment yet)"
    click.echo(f"connection {c['name']}: URL from ${c['url_env']}{note}")


@connections.command("list")
@click.option("--json", "as_json", is_flag=True)
@pass_obj
def connections_list(obj: Obj, as_json: bool) -> None:
    data = obj.client.get("/api/v1/connections")
    _out(data) if as_json else _table(data["connections"], ["name", "url_env", "url_set", "created_at"])


@connections.command("remove")
@click.argument("name")
@pass_obj
def connections_remove(obj: Obj, name: str) -> None:
    obj.client.request("DELETE", api_path("connections", name))
    click.echo(f"removed connection {name}")


from modelcd.cli_users import tokens, users  # noqa: E402 (they use the helpers above)

main.add_command(users)
main.add_command(tokens)
