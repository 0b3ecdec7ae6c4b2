"""Retirement and archiving in one process, against a real store and the real router (no
release runner, so queued releases stay queued): queued releases are cancelled, running ones
refuse with their id, a retired endpoint is answered 410 by the router, an archived model's
auto release is skipped with an event and a promote is refused, and a job a dead process left
running is closed after a restart."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import requests

from modelcd.config import load_settings
from modelcd.context import Context, build_context
from modelcd.domain import DeploymentState, JobState, JobType
from modelcd.errors import Conflict, InvalidInput
from modelcd.registry.service import parse_metadata
from modelcd.releases.dispatcher import dispatch_outbox
from modelcd.releases.machine import Phase
from modelcd.releases.manual import rollback_endpoint, start_release
from modelcd.releases.retirement import archive_model, resume_interrupted, retire_endpoint, unarchive_model
from modelcd.routing.table import EndpointRoute, RoutingTable
from modelcd.targets.process import free_port
from tests.conftest import iris_model
from tests.routing.conftest import EchoBackend


@pytest.fixture
def ctx(tmp_path: Path) -> Iterator[Context]:
    settings = load_settings(environ={"MODELCD_HOME": str(tmp_path / "home"), "MODELCD_TOKEN": "t" * 24,
                                      "MODELCD_ROUTER_PORT": str(free_port())})
    c = build_context(settings)
    c.router.ensure_running()
    try:
        yield c
    finally:
        c.router.stop()
        c.db.dispose()


def _version(ctx: Context, tmp_path: Path, name: str = "iris") -> int:
    folder = tmp_path / f"v{len(list(tmp_path.glob('v*')))}"
    meta = iris_model(folder)
    return ctx.registry.import_files(name, folder, parse_metadata(meta)).version


def _serving(ctx: Context, backend: EchoBackend, version: int = 1) -> str:
    """A deployment of iris v``version`` on ``backend`` holding all of iris/production."""
    d = ctx.deployments.create(model="iris", version=version, environment="production", target="process",
                               release_id=None, spec={"bundle": "/nonexistent"})
    ctx.deployments.update(d.id, state=DeploymentState.READY, url=backend.url)
    ctx.traffic.switch("iris", "production", {d.id: 100}, previous=None, auth="none")
    return d.id


def _score(ctx: Context) -> requests.Response:
    return requests.post(f"{ctx.settings.router_url}/iris/production/score", json={"data": []}, timeout=5)


def test_retire_cancels_queued_releases_and_the_router_answers_410(ctx: Context, tmp_path: Path) -> None:
    backend = EchoBackend("b1")
    try:
        _version(ctx, tmp_path)
        dispatch_outbox(ctx)  # the auto release of v1: queued (no runner here)
        [queued] = ctx.releases.list(model="iris")
        dep = _serving(ctx, backend)
        assert _score(ctx).status_code == 200

        job = retire_endpoint(ctx, "iris", "production")
        assert job.state is JobState.SUCCEEDED and job.type is JobType.RETIRE, job
        cancelled = ctx.releases.get(queued.id)
        assert cancelled.phase is Phase.CANCELLED and job.id in (cancelled.error or "")
        r = _score(ctx)
        assert r.status_code == 410 and r.json()["error"] == "endpoint_retired", r.text
        assert "retired at" in r.json()["message"] and "modelcd promote iris VERSION --env production" in \
            r.json()["message"]
        assert ctx.router.read().retired == {"iris/production": ctx.traffic.get("iris", "production").retired_at}
        ep = ctx.traffic.get("iris", "production").to_dict()
        assert ep["state"] == "retired" and ep["traffic"] == {} and ep["previous_traffic"] == {dep: 100}
        assert ctx.deployments.get(dep).state is DeploymentState.STOPPED  # the record stays
        kinds = [e["kind"] for e in ctx.jobs.events(job_id=job.id)]
        assert "endpoint.retired" in kinds and "deployment.stopped" in kinds and kinds[-1] == "job.succeeded"

        with pytest.raises(Conflict, match="retired at .* already"):
            retire_endpoint(ctx, "iris", "production")
        with pytest.raises(Conflict, match="retired at .*nothing serves to roll back"):
            rollback_endpoint(ctx, "iris", "production")

        _serving(ctx, backend)  # what a release's promote does: traffic again, no longer retired
        assert _score(ctx).status_code == 200
        assert ctx.traffic.get("iris", "production").retired_at is None and ctx.router.read().retired == {}
    finally:
        backend.close()


def test_a_running_release_refuses_retire_and_archive_naming_it(ctx: Context, tmp_path: Path) -> None:
    backend = EchoBackend("b1")
    try:
        v = _version(ctx, tmp_path)
        _serving(ctx, backend)
        rid = start_release(ctx, "iris", v, "production")
        assert ctx.releases.claim(rid)  # building: it holds the endpoint
        with pytest.raises(Conflict, match=f"cannot retire iris/production while a release of it runs: {rid} "
                                           rf"\(iris v1 → production, building\); stop it with "
                                           f"`modelcd releases stop {rid}`"):
            retire_endpoint(ctx, "iris", "production")
        with pytest.raises(Conflict, match=f"cannot archive model iris while a release of it runs: {rid}"):
            archive_model(ctx, "iris")
        assert _score(ctx).status_code == 200 and ctx.traffic.get("iris", "production").retired_at is None
        assert not any(j.type in (JobType.RETIRE, JobType.ARCHIVE) for j in ctx.jobs.list())  # refused: no job
    finally:
        backend.close()


def test_an_archived_model_records_versions_but_releases_none(ctx: Context, tmp_path: Path) -> None:
    _version(ctx, tmp_path)
    queued = start_release(ctx, "iris", 1, "production")
    job = archive_model(ctx, "iris")
    assert job.state is JobState.SUCCEEDED and ctx.releases.get(queued).phase is Phase.CANCELLED
    assert ctx.registry.get_model("iris")["archived_at"]

    v2 = _version(ctx, tmp_path)  # recorded as ever
    dispatch_outbox(ctx)
    assert [r.version for r in ctx.releases.list(model="iris")] == [1]  # no release of v2
    skipped = [e["message"] for e in ctx.jobs.events(job_id=job.id) if e["kind"] == "release.skipped"]
    assert [m[:44] for m in skipped] == ["iris v1 recorded, no release: model archived",  # its event was pending
                                         "iris v2 recorded, no release: model archived"], skipped
    with pytest.raises(Conflict, match="model iris is archived .*`modelcd models unarchive iris` first"):
        start_release(ctx, "iris", v2, "production")
    with pytest.raises(Conflict, match="archived at .* already"):
        archive_model(ctx, "iris")

    undone = unarchive_model(ctx, "iris")
    assert undone.state is JobState.SUCCEEDED
    log = [line["line"] for line in ctx.jobs.logs(undone.id)]
    assert any("v2 was registered while archived" in line for line in log), log
    assert ctx.releases.get(start_release(ctx, "iris", v2, "production")).phase is Phase.QUEUED
    with pytest.raises(Conflict, match="not archived"):
        unarchive_model(ctx, "iris")


def test_jobs_a_dead_process_left_running_are_closed_on_start(ctx: Context, tmp_path: Path) -> None:
    _version(ctx, tmp_path)
    before = ctx.jobs.create(JobType.RETIRE, model="iris", environment="production")  # died before its change
    ctx.jobs.transition(before.id, JobState.RUNNING)
    archived = ctx.jobs.create(JobType.ARCHIVE, model="iris")  # died after its transaction
    ctx.jobs.transition(archived.id, JobState.RUNNING)
    archive_model(ctx, "iris")
    assert set(resume_interrupted(ctx)) == {before.id, archived.id}
    assert ctx.jobs.get(before.id).state is JobState.FAILED
    assert "nothing changed" in (ctx.jobs.get(before.id).error or "")
    assert ctx.jobs.get(archived.id).state is JobState.SUCCEEDED


def test_the_routing_table_keeps_retired_endpoints_apart_and_checks_them() -> None:
    table = RoutingTable(3, {}, {"iris/production": "2026-01-01T00:00:00.000+00:00"})
    assert RoutingTable.from_json(table.to_json()) == table
    assert "retired" not in RoutingTable(3).to_dict()  # a table without any reads as before
    with pytest.raises(InvalidInput, match="a retired endpoint has no route"):
        RoutingTable(1, {"iris/production": EndpointRoute(())}, {"iris/production": "2026-01-01"})
    with pytest.raises(InvalidInput, match=r"retired: key 'iris' must be 'model/env'.*retired\['iris'\]: must be"):
        RoutingTable.from_dict({"generation": 1, "endpoints": {}, "retired": {"iris": 5}})
    assert RoutingTable(1, {}, {"iris/production": "t"}).with_route(
        "iris", "production", EndpointRoute(())).retired == {}  # routed again: no longer retired
