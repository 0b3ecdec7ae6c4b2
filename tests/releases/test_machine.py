"""The release state machine as data, and release/job records on a real SQLite store."""

from __future__ import annotations

from pathlib import Path

import pytest

from modelcd.domain import JobState, JobType
from modelcd.errors import Conflict
from modelcd.jobs.service import Jobs, Redactor
from modelcd.releases.machine import (
    NEXT_ON_SUCCESS,
    STAGE_OF,
    TERMINAL,
    TRANSITIONS,
    Phase,
    after_success,
    check_transition,
)
from modelcd.releases.policy import DEFAULT_POLICY
from modelcd.releases.service import Releases
from modelcd.store.db import Database


def test_every_phase_has_transitions_and_terminal_ones_have_none() -> None:
    assert set(TRANSITIONS) == set(Phase)
    for phase in TERMINAL:
        assert TRANSITIONS[phase] == frozenset() and phase.terminal and not phase.active
    for phase, nxt in NEXT_ON_SUCCESS.items():
        assert nxt in TRANSITIONS[phase]
        assert Phase.ROLLING_BACK in TRANSITIONS[phase]  # every stage can roll back
        assert phase in STAGE_OF


def test_production_is_reached_only_through_smoke() -> None:
    """No path reaches `promoting` except from `smoke_testing`, directly or through the
    approval gate, which only `smoke_testing` leads to."""
    assert [p for p, nxt in TRANSITIONS.items() if Phase.PROMOTING in nxt] == [Phase.SMOKE_TESTING,
                                                                                Phase.AWAITING_APPROVAL]
    assert [p for p, nxt in TRANSITIONS.items() if Phase.AWAITING_APPROVAL in nxt] == [Phase.SMOKE_TESTING]
    assert TRANSITIONS[Phase.AWAITING_APPROVAL] == {Phase.PROMOTING, Phase.ROLLING_BACK}
    assert Phase.AWAITING_APPROVAL.active  # it holds its endpoint...
    assert Phase.AWAITING_APPROVAL not in STAGE_OF  # ...and runs nothing


def test_smoke_leads_to_the_gate_only_when_the_environment_has_one() -> None:
    assert after_success(Phase.SMOKE_TESTING, approval=True) is Phase.AWAITING_APPROVAL
    assert after_success(Phase.SMOKE_TESTING, approval=False) is Phase.PROMOTING
    for phase, nxt in NEXT_ON_SUCCESS.items():
        if phase is not Phase.SMOKE_TESTING:
            assert after_success(phase, approval=True) is nxt


def test_build_leads_to_the_evaluation_gate_only_when_the_environment_has_one() -> None:
    from modelcd.releases.engine import STAGE_ORDER, done_before

    assert after_success(Phase.BUILDING, approval=False, evaluation=True) is Phase.EVALUATING
    assert after_success(Phase.BUILDING, approval=False, evaluation=False) is Phase.DEPLOYING
    assert after_success(Phase.EVALUATING, approval=True, evaluation=True) is Phase.DEPLOYING
    assert STAGE_ORDER[:3] == (Phase.BUILDING, Phase.EVALUATING, Phase.DEPLOYING)
    assert done_before(Phase.DEPLOYING, Phase.EVALUATING) and not done_before(Phase.EVALUATING, Phase.EVALUATING)
    assert [p for p, nxt in TRANSITIONS.items() if Phase.EVALUATING in nxt] == [Phase.BUILDING]
    assert STAGE_OF[Phase.EVALUATING] is JobType.EVALUATE


@pytest.mark.parametrize(("current", "to"), [
    (Phase.QUEUED, Phase.PROMOTING), (Phase.BUILDING, Phase.SUCCEEDED), (Phase.SUCCEEDED, Phase.ROLLING_BACK),
    (Phase.ROLLING_BACK, Phase.SUCCEEDED), (Phase.FAILED, Phase.QUEUED),
])
def test_illegal_moves_are_refused(current: Phase, to: Phase) -> None:
    with pytest.raises(Conflict, match=f"from {current} to {to}"):
        check_transition(current, to)


@pytest.fixture
def stores(tmp_path: Path) -> tuple[Database, Jobs, Releases]:
    db = Database(f"sqlite:///{tmp_path / 'm.db'}")
    jobs = Jobs(db, Redactor())
    return db, jobs, Releases(db, jobs)


def _queue(db: Database, releases: Releases, version: int, env: str = "production") -> str:
    with db.write() as conn:
        return releases.create_in(conn, model="iris", version=version, environment=env, policy=DEFAULT_POLICY,
                                  env_index=0, trigger="auto")


def test_newer_queued_version_supersedes_older_queued_one(stores: tuple[Database, Jobs, Releases]) -> None:
    db, _, releases = stores
    r1 = _queue(db, releases, 1)
    assert releases.claim(r1)  # running: not superseded by what comes next
    r2 = _queue(db, releases, 2)
    r3 = _queue(db, releases, 3)
    other_env = _queue(db, releases, 3, env="staging")
    assert releases.get(r1).phase is Phase.BUILDING
    assert releases.get(r2).phase is Phase.SUPERSEDED and "v3" in (releases.get(r2).error or "")
    assert releases.get(r3).phase is Phase.QUEUED
    assert releases.get(other_env).phase is Phase.QUEUED


def test_one_active_release_per_endpoint(stores: tuple[Database, Jobs, Releases]) -> None:
    db, _, releases = stores
    r1 = _queue(db, releases, 1)
    staging = _queue(db, releases, 1, env="staging")
    assert releases.claim(r1) and releases.claim(staging)
    r2 = _queue(db, releases, 2)
    assert not releases.claim(r2)  # production busy with r1
    for phase in (Phase.DEPLOYING, Phase.SMOKE_TESTING, Phase.PROMOTING, Phase.SUCCEEDED):
        releases.advance(r1, phase)
    assert releases.claim(r2)
    assert not releases.claim(r2)  # already claimed


def test_advance_records_events_and_refuses_illegal(stores: tuple[Database, Jobs, Releases]) -> None:
    db, jobs, releases = stores
    rid = _queue(db, releases, 1)
    releases.claim(rid)
    with pytest.raises(Conflict):
        releases.advance(rid, Phase.PROMOTING)
    releases.advance(rid, Phase.ROLLING_BACK, "build failed", error="build failed: boom")
    rel = releases.advance(rid, Phase.FAILED, "rolled back")
    assert rel.phase is Phase.FAILED and rel.finished_at and rel.error == "build failed: boom"
    kinds = [e["kind"] for e in jobs.events(release_id=rid)]
    assert kinds == ["release.queued", "release.building", "release.rolling_back", "release.failed"]


def test_stop_of_queued_release_ends_it_and_of_promoting_is_refused(stores: tuple[Database, Jobs, Releases]) -> None:
    db, _, releases = stores
    rid = _queue(db, releases, 1)
    assert releases.request_cancel(rid).phase is Phase.CANCELLED
    with pytest.raises(Conflict, match="already cancelled"):
        releases.request_cancel(rid)
    rid = _queue(db, releases, 2)
    releases.claim(rid)
    for phase in (Phase.DEPLOYING, Phase.SMOKE_TESTING, Phase.PROMOTING):
        releases.advance(rid, phase)
    with pytest.raises(Conflict, match="modelcd rollback"):
        releases.request_cancel(rid)


def test_job_lifecycle_and_redaction(stores: tuple[Database, Jobs, Releases]) -> None:
    _, jobs, _ = stores
    jobs.redact.add("s3cr3t-value")
    job = jobs.create(JobType.BUILD, model="iris", version=1)
    jobs.transition(job.id, JobState.SCHEDULED)
    jobs.transition(job.id, JobState.RUNNING)
    jobs.logger(job.id)("line one\nusing token s3cr3t-value here")
    done = jobs.transition(job.id, JobState.FAILED, error="failed with s3cr3t-value")
    assert done.state is JobState.FAILED and done.started_at and done.finished_at
    assert "s3cr3t" not in (done.error or "") and "***" in (done.error or "")
    assert [entry["line"] for entry in jobs.logs(job.id)] == ["line one", "using token *** here"]
    assert [e["kind"] for e in jobs.events(job_id=job.id)] == ["job.created", "job.scheduled", "job.running",
                                                                "job.failed"]
    assert all("s3cr3t" not in e["message"] for e in jobs.events(job_id=job.id))
    with pytest.raises(Conflict):
        jobs.transition(job.id, JobState.RUNNING)
    with pytest.raises(Conflict, match="nothing to stop"):
        jobs.request_cancel(job.id)
