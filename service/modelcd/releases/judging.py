"""The promote stage's judgement of what a candidate predicts: the shadow phase (strategy
``shadow``) and mirrored canary steps (``mirror: true``).

The router copies live requests to the candidate (``Traffic.set_mirror``) and keeps the pairs of
answers; this module reads them (``Router.mirror_pairs``) every ``POLL_S``, judges them with the
policy's ``analysis`` gates (``analysis.shadow``), records each verdict as an event and on the
release (``releases show``), and stops as soon as the verdict is decided: a failing or erroring
verdict raises (the rollback stage puts everything back), a passing one returns. The copies stop
whatever happens.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

from modelcd.analysis.shadow import PairedRows, Verdict, judge
from modelcd.analysis.smoke import Outcome
from modelcd.errors import Cancelled, ModelcdError, RouterError, StageFailed
from modelcd.releases.policy import Analysis

if TYPE_CHECKING:
    from modelcd.analysis.statistics import DatasetStats
    from modelcd.releases.stage_run import StageRun

POLL_S = 0.2  # how often the router's pairs are read
EVENT_EVERY_S = 2.0  # an undecided verdict is recorded this often (a decided one at once)


class PairWatch:
    """The pairs of one endpoint's candidate, read from the router as they come."""

    def __init__(self, run: StageRun, analysis: Analysis, stats: DatasetStats | None) -> None:
        self.run = run
        self.analysis = analysis
        self.stats = stats
        self.rows = PairedRows()
        self.after = 0
        self.counters: dict[str, Any] = {}

    def poll(self) -> Verdict:
        """Read the pairs since the last poll and judge all gathered so far."""
        rel, router = self.run.release, self.run.ctx.router
        while True:
            batch = router.mirror_pairs(rel.model, rel.environment, after=self.after, limit=5000)
            pairs = batch.get("pairs") or []
            self.counters = {k: batch.get(k) for k in ("mirrored", "dropped", "candidate_errors", "truncated")}
            if pairs:
                self.rows.add(pairs)
                self.after = int(pairs[-1]["seq"])
            if len(pairs) < 5000:
                break
        verdict = judge(self.rows, self.analysis, self.stats)
        verdict.figures["router"] = self.counters
        return verdict


def watch(run: StageRun, analysis: Analysis, stats: DatasetStats | None, seconds: float, what: str) -> Verdict:
    """Judge the pairs for up to ``seconds`` or until decided; return the last verdict."""
    watch = PairWatch(run, analysis, stats)
    deadline = time.monotonic() + seconds
    last_event, last_outcome = 0.0, None
    while True:
        if run.stopped():
            raise Cancelled(f"{what} stopped by a person")
        try:
            verdict = watch.poll()
        except RouterError as e:
            run.log(f"{what}: could not read the pairs from the router ({e.message}); trying again")
            time.sleep(POLL_S)
            if time.monotonic() > deadline:
                raise StageFailed(f"{what}: the router kept no pairs to judge ({e.message})") from e
            continue
        decided = verdict.outcome is not Outcome.INCONCLUSIVE
        now = time.monotonic()
        if decided or verdict.outcome != last_outcome or now - last_event >= EVENT_EVERY_S:
            record(run, what, verdict)
            last_event, last_outcome = now, verdict.outcome
        if verdict.outcome in (Outcome.FAILED, Outcome.ERROR):
            return verdict
        if decided or now >= deadline:
            return verdict
        time.sleep(POLL_S)


def record(run: StageRun, what: str, verdict: Verdict) -> None:
    """The verdict as an event and in the release's analysis record (what ``releases show`` prints)."""
    rel, ctx = run.release, run.ctx
    line = f"{what}: {verdict.outcome} — {verdict.summary}"
    run.log(line)
    ctx.jobs.event(None, rel.id, "analysis.step", line)
    steps = list(ctx.releases.get(rel.id).analysis or [])
    doc = {"step": what, **verdict.to_dict(), "at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    if steps and steps[-1].get("step") == what:
        steps[-1] = doc  # the same step, judged again: keep its latest figures
    else:
        steps.append(doc)
    ctx.releases.update(rel.id, analysis=steps)


def raise_unless_passed(verdict: Verdict, what: str, seconds: float) -> None:
    """StageFailed with the figures unless ``verdict`` passed."""
    if verdict.outcome is Outcome.PASSED:
        return
    failing = verdict.failing()
    if verdict.outcome is Outcome.INCONCLUSIVE:
        raise StageFailed(f"{what} inconclusive after {seconds:g}s: {verdict.figures['rows']} of min_samples "
                          f"{verdict.figures['min_samples']} pairs ({verdict.summary}); send more traffic or lower "
                          "analysis.min_samples")
    reason = failing.message if failing is not None else str(verdict.outcome)
    raise StageFailed(f"{what} {verdict.outcome}: {reason} ({verdict.summary})")


def shadow_phase(run: StageRun, dep_id: str) -> None:
    """Strategy shadow: the candidate gets copies of live requests while the champion answers,
    until its answers pass the analysis gates (or fail them, or ``shadow_s`` runs out)."""
    rel, ctx, env = run.release, run.ctx, run.env
    assert env.analysis is not None and env.shadow_s is not None  # defaults filled in by the policy
    stats = training_statistics(run)
    ctx.traffic.set_mirror(rel.model, rel.environment, dep_id, env.sample_rate, run.log)
    try:
        run.log(f"shadow: {env.sample_rate:.0%} of live requests copied to v{rel.version} for up to "
                f"{env.shadow_s:g}s; the champion answers every client")
        verdict = watch(run, env.analysis, stats, env.shadow_s, "shadow")
    finally:
        stop_mirror(run)
    raise_unless_passed(verdict, "shadow", env.shadow_s)


def stop_mirror(run: StageRun) -> None:
    """Stop the copies (best effort: the rollback stage and the next table drop them too)."""
    rel = run.release
    try:
        run.ctx.traffic.set_mirror(rel.model, rel.environment, None, log=run.log)
    except ModelcdError as e:
        run.log(f"could not stop the copies yet ({e.message}); the rollback or next change of the endpoint does")


def training_statistics(run: StageRun) -> DatasetStats | None:
    """The version's training statistics, when the gates need them and they were computed."""
    env = run.env
    if env.analysis is None or env.analysis.max_input_psi is None:
        return None
    getter = getattr(run.ctx.registry, "get_statistics", None)
    if getter is None:
        return None
    try:
        return getter(run.release.model, run.release.version)  # type: ignore[no-any-return]
    except ModelcdError:
        return None


class CanaryMirror:
    """A canary with ``mirror: true``: the copies of the champion's requests go to the candidate
    through all steps; the pairs are judged during each step's hold (``check``, called by the
    hold's loop) and a failing or erroring verdict ends the step at once."""

    def __init__(self, run: StageRun, dep_id: str) -> None:
        env = run.env
        self.run = run
        self.dep_id = dep_id
        self.analysis = env.analysis or Analysis()
        self.watch = PairWatch(run, self.analysis, training_statistics(run))
        self.step = "canary"
        self.verdict: Verdict | None = None
        self._last = 0.0

    def __enter__(self) -> CanaryMirror:
        rel, env = self.run.release, self.run.env
        self.run.ctx.traffic.set_mirror(rel.model, rel.environment, self.dep_id, env.sample_rate, self.run.log)
        return self

    def __exit__(self, *exc: object) -> None:
        stop_mirror(self.run)

    def check(self) -> bool:
        """For the hold's ``stopped`` callback: judge what came; raise StageFailed on a failing
        verdict; False (go on holding) otherwise."""
        try:
            verdict = self.watch.poll()
        except RouterError as e:
            self.run.log(f"{self.step}: could not read the pairs from the router ({e.message})")
            return False
        now = time.monotonic()
        if verdict.outcome != (self.verdict.outcome if self.verdict else None) or now - self._last >= EVENT_EVERY_S:
            record(self.run, self.step, verdict)
            self._last = now
        self.verdict = verdict
        if verdict.outcome in (Outcome.FAILED, Outcome.ERROR):
            raise_unless_passed(verdict, self.step, 0)
        return False

    def finish(self) -> None:
        """After the last step below 100%: the candidate's answers must have passed."""
        self.check()
        assert self.verdict is not None
        record(self.run, self.step, self.verdict)
        raise_unless_passed(self.verdict, "canary (mirrored)", self.run.env.step_hold_s or 0)
