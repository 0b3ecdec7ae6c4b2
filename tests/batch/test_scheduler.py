"""The batch scheduler with an injected clock and a fake scorer: cron occurrences, @once once,
pause, catch-up once after downtime, never twice with two schedulers on one store."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from modelcd.batch.deployments import BatchDeployments
from modelcd.batch.scheduler import BatchScheduler, fail_interrupted
from modelcd.batch.schedules import Schedule, parse_schedule
from modelcd.config import load_settings
from modelcd.context import Context, build_context
from modelcd.domain import JobState
from modelcd.errors import Cancelled, Conflict, InvalidInput, NotFound
from modelcd.store import schema
from modelcd.store.db import now
from tests.conftest import free_port, wait_until

T0 = datetime(2026, 3, 2, 10, 0, 0, tzinfo=UTC).timestamp()  # a Monday, on the hour


@dataclass(frozen=True)
class Result:
    rows_read: int
    rows_scored: int
    errors: int
    first_errors: list[str]
    seconds: float
    output: str


class Clock:
    def __init__(self, t: float) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


class FakeScorer:
    """Records its calls; ``hold`` keeps a run going until released (or stopped)."""

    def __init__(self) -> None:
        self.calls: list[dict[str, Any]] = []
        self.hold = threading.Event()
        self.hold.set()
        self.lock = threading.Lock()

    def __call__(self, ctx: Context, **kw: Any) -> Result:
        with self.lock:
            self.calls.append(kw)
        kw["log"]("fake scorer reading")
        deadline = time.monotonic() + 30
        while not self.hold.wait(0.02):
            if kw["cancel"].is_set():
                raise Cancelled("stop requested")
            assert time.monotonic() < deadline
        return Result(rows_read=10, rows_scored=9, errors=1, first_errors=["row 3: bad value"], seconds=0.5,
                      output=kw["output_uri"])


@pytest.fixture
def ctx(tmp_path: Path) -> Iterator[Context]:
    settings = load_settings(environ={"MODELCD_HOME": str(tmp_path / "home"), "MODELCD_TOKEN": "t" * 24,
                                      "MODELCD_ROUTER_PORT": str(free_port())})
    c = build_context(settings)
    ts = now()
    with c.db.write() as conn:
        conn.execute(schema.models.insert().values(name="iris", description="", created_at=ts))
        conn.execute(schema.versions.insert().values(
            model="iris", version=1, digest="0" * 64, flavor="sklearn", requirements=[], metrics={}, tags={},
            description="", source="native", artifact_uri="x", size_bytes=0, status="ready", created_at=ts))
    yield c
    c.db.dispose()


def make(ctx: Context, clock: Clock, name: str = "nightly", **kw: Any) -> BatchDeployments:
    store = BatchDeployments(ctx, clock=clock)
    store.create({"name": name, "model": "iris", "version": 1, "input": "in.csv", "output": "out.csv", **kw})
    return store


def scheduler(ctx: Context, clock: Clock, scorer: FakeScorer) -> BatchScheduler:
    return BatchScheduler(ctx, clock=clock, scorer=scorer, wake_event=threading.Event())


def ended(ctx: Context, sched: BatchScheduler) -> list[str]:
    wait_until(lambda: not sched.running(), timeout_s=30, poll_s=0.01)
    return [r["state"] for r in BatchDeployments(ctx).runs("nightly")]


def test_schedule_specs_and_their_errors() -> None:
    assert parse_schedule(None).kind == "manual"
    assert parse_schedule("@ONCE").kind == "once"
    hourly = parse_schedule("@hourly")
    assert hourly.next_after(T0) == T0 + 3600 and hourly.latest_at_or_before(T0) == T0
    assert parse_schedule("* * * * * */10").next_after(T0 + 1) == T0 + 10  # sixth field: seconds
    assert parse_schedule("@weekly").latest_at_or_before(T0) == datetime(2026, 3, 1, tzinfo=UTC).timestamp()
    assert parse_schedule("@yearly").next_after(T0) == datetime(2027, 1, 1, tzinfo=UTC).timestamp()
    paris = Schedule("0 6 * * *", "Europe/Paris")  # 06:00 in Paris: 05:00 UTC in winter, 04:00 in summer
    assert datetime.fromtimestamp(paris.next_after(T0), UTC).hour == 5
    assert datetime.fromtimestamp(paris.next_after(datetime(2026, 7, 1, tzinfo=UTC).timestamp()), UTC).hour == 4
    for spec in ("61 * * * *", "* * * *", "@sometimes", "0 0 31 2 *"):
        with pytest.raises(InvalidInput) as e:
            parse_schedule(spec)
        assert e.value.field == "schedule" and "@daily" in e.value.message
    with pytest.raises(InvalidInput) as e:
        parse_schedule("@daily", "Mars/Olympus")
    assert e.value.field == "zone" and "Europe/Paris" in e.value.message


def test_create_validates_each_field(ctx: Context) -> None:
    store = BatchDeployments(ctx)
    good = {"name": "b", "model": "iris", "version": 1, "input": "in.csv", "output": "out.csv"}
    for change, field in (({"name": "bad name"}, "name"), ({"model": "nope"}, "model"), ({"version": 7}, "version"),
                          ({"version": None}, "version"), ({"environment": "production"}, "version"),
                          ({"schedule": "every day"}, "schedule"), ({"zone": "Nowhere"}, "zone"),
                          ({"format": "xls"}, "format"), ({"keys": "id"}, "keys"), ({"max_errors": -1}, "max_errors"),
                          ({"input": ""}, "input"), ({"output": None}, "output"), ({"catch_up": "all"}, "catch_up")):
        with pytest.raises((InvalidInput, NotFound)) as e:
            store.create({**good, **change})
        assert e.value.field == field, (change, e.value)
    with pytest.raises(NotFound) as e:
        store.create({**good, "version": None, "environment": "production"})
    assert e.value.field == "environment" and "promote" in e.value.message
    store.create(good)
    with pytest.raises(Conflict):
        store.create(good)


def test_cron_occurrences_fire_once_each(ctx: Context) -> None:
    clock, scorer = Clock(T0 + 0.2), FakeScorer()
    store = make(ctx, clock, schedule="* * * * * */10", keys=["id"], max_errors=5)
    sched = scheduler(ctx, clock, scorer)
    try:
        assert sched.tick() == []
        assert sched.seconds_to_next(5.0) == pytest.approx(5.0)  # next at T0 + 10
        clock.t = T0 + 10.0
        [job] = sched.tick()
        assert sched.tick() == []  # same occurrence: nothing more
        assert ended(ctx, sched) == ["succeeded"]
        assert scorer.calls[0]["keys"] == ["id"] and scorer.calls[0]["max_errors"] == 5
        lines = [e["line"] for e in ctx.jobs.logs(job)]
        assert any("rows read 10, rows scored 9, rows/s 18, errors 1" in line for line in lines), lines
        assert any("row 3: bad value" in line for line in lines)
        clock.t = T0 + 20.4
        assert len(sched.tick()) == 1
        assert ended(ctx, sched) == ["succeeded", "succeeded"]
        runs = store.runs("nightly")
        assert [r["occurrence"] for r in runs] == ["2026-03-02T10:00:20.000+00:00", "2026-03-02T10:00:10.000+00:00"]
        assert store.show("nightly")["next_run_at"] == "2026-03-02T10:00:30.000+00:00"
    finally:
        sched.stop(wait=True)


def test_once_runs_once_and_manual_never_by_itself(ctx: Context) -> None:
    clock, scorer = Clock(T0), FakeScorer()
    store = make(ctx, clock, schedule="@once")
    make(ctx, clock, name="byhand")
    sched = scheduler(ctx, clock, scorer)
    try:
        assert len(sched.tick()) == 1
        ended(ctx, sched)
        for step in (60, 3600, 86400 * 400):
            clock.t = T0 + step
            assert sched.tick() == []
        assert len(store.runs("nightly")) == 1 and store.runs("byhand") == []
        job = store.run_now("byhand")
        sched.tick()
        wait_until(lambda: ctx.jobs.get(job).state is JobState.SUCCEEDED, timeout_s=30, poll_s=0.01)
        assert store.show("nightly")["next_run_at"] is None
    finally:
        sched.stop(wait=True)


def test_pause_stops_and_resume_starts_from_now(ctx: Context) -> None:
    clock, scorer = Clock(T0), FakeScorer()
    store = make(ctx, clock, schedule="* * * * *")
    sched = scheduler(ctx, clock, scorer)
    try:
        store.set_paused("nightly", True)
        assert store.show("nightly")["next_run_at"] is None
        for minute in range(1, 5):
            clock.t = T0 + 60 * minute
            assert sched.tick() == []
        clock.t = T0 + 290
        store.set_paused("nightly", False)
        assert sched.tick() == []  # what fell due while paused does not run
        clock.t = T0 + 300
        assert len(sched.tick()) == 1
        assert ended(ctx, sched) == ["succeeded"]
    finally:
        sched.stop(wait=True)


def test_missed_occurrences_after_downtime_run_once(ctx: Context) -> None:
    clock, scorer = Clock(T0), FakeScorer()
    make(ctx, clock, schedule="* * * * *")
    make(ctx, clock, name="skipper", schedule="* * * * *", catch_up="skip")
    clock.t = T0 + 3600 * 5 + 30  # "down" for five hours: 300 occurrences missed
    sched = scheduler(ctx, clock, scorer)  # a new process, the same store
    try:
        assert len(sched.tick()) == 1  # nightly: once (the latest); skipper: none
        assert sched.tick() == []
        assert ended(ctx, sched) == ["succeeded"]
        store = BatchDeployments(ctx)
        assert [r["occurrence"] for r in store.runs("nightly")] == ["2026-03-02T15:00:00.000+00:00"]
        assert store.runs("skipper") == []
        clock.t = T0 + 3600 * 5 + 60
        assert len(sched.tick()) == 2  # both on time again
    finally:
        sched.stop(wait=True)


def test_two_schedulers_on_one_store_never_run_an_occurrence_twice(ctx: Context) -> None:
    clock, scorer = Clock(T0), FakeScorer()
    make(ctx, clock, schedule="* * * * * *")  # every second
    make(ctx, clock, name="once", schedule="@once")
    other = build_context(ctx.settings)  # a second process's context on the same database
    a, b = scheduler(ctx, clock, scorer), scheduler(other, clock, scorer)
    try:
        claimed: list[str] = []
        for second in range(1, 31):
            clock.t = T0 + second
            barrier = threading.Barrier(2)

            def tick(s: BatchScheduler, barrier: threading.Barrier = barrier) -> None:
                barrier.wait()
                claimed.extend(s.tick())

            threads = [threading.Thread(target=tick, args=(s,)) for s in (a, b)]
            for t in threads:
                t.start()
            for t in threads:
                t.join(30)
            wait_until(lambda: not a.running() and not b.running(), timeout_s=30, poll_s=0.01)
        store = BatchDeployments(ctx)
        occurrences = [r["occurrence"] for r in store.runs("nightly", limit=100)]
        assert len(occurrences) == len(set(occurrences)) == 30
        assert len(store.runs("once")) == 1 and len(claimed) == 31
        assert len(scorer.calls) == 31  # each run started by one process only
    finally:
        a.stop(wait=True)
        b.stop(wait=True)
        other.db.dispose()


def test_an_occurrence_waits_for_the_run_in_progress_and_stop_cancels(ctx: Context) -> None:
    clock, scorer = Clock(T0), FakeScorer()
    store = make(ctx, clock, schedule="* * * * *")
    sched = scheduler(ctx, clock, scorer)
    try:
        scorer.hold.clear()
        clock.t = T0 + 60
        [first] = sched.tick()
        wait_until(lambda: scorer.calls, timeout_s=10, poll_s=0.01)
        clock.t = T0 + 120
        assert sched.tick() == []  # waits for the run in progress
        with pytest.raises(Conflict) as e:
            store.run_now("nightly")
        assert first in e.value.message
        with pytest.raises(Conflict) as e:
            store.delete("nightly")
        assert first in e.value.message and "modelcd jobs stop" in e.value.message
        ctx.jobs.request_cancel(first)
        wait_until(lambda: ctx.jobs.get(first).state is JobState.CANCELLED, timeout_s=10, poll_s=0.01)
        scorer.hold.set()
        assert len(sched.tick()) == 1  # the waiting occurrence runs once, late
        assert ended(ctx, sched) == ["succeeded", "cancelled"]
        store.delete("nightly")
        with pytest.raises(NotFound):
            store.get("nightly")
    finally:
        scorer.hold.set()
        sched.stop(wait=True)


def test_a_restart_fails_a_running_run_and_starts_scheduled_ones(ctx: Context) -> None:
    clock = Clock(T0)
    store = make(ctx, clock)
    job = store.run_now("nightly")
    assert fail_interrupted(ctx) == []
    ctx.jobs.transition(job, JobState.RUNNING)
    assert fail_interrupted(ctx) == [job]
    assert "restart" in (ctx.jobs.get(job).error or "")
    waiting = store.run_now("nightly")
    scorer = FakeScorer()
    sched = scheduler(ctx, clock, scorer)
    try:
        sched.tick()
        wait_until(lambda: ctx.jobs.get(waiting).state is JobState.SUCCEEDED, timeout_s=30, poll_s=0.01)
    finally:
        sched.stop(wait=True)


def test_env_follows_the_version_with_the_largest_weight(ctx: Context, monkeypatch: pytest.MonkeyPatch) -> None:
    from types import SimpleNamespace

    from modelcd.batch.scheduler import serving_version

    split = {"versions": {1: 10, 2: 90}}
    monkeypatch.setattr(ctx.traffic, "get", lambda model, env: SimpleNamespace(versions=split["versions"]))
    assert serving_version(ctx, "iris", "production") == 2
    split["versions"] = {1: 100, 2: 0}
    assert serving_version(ctx, "iris", "production") == 1
    split["versions"] = {1: 0}
    with pytest.raises(NotFound) as e:
        serving_version(ctx, "iris", "production")
    assert e.value.field == "environment" and "--version" in e.value.message
