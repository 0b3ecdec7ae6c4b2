"""A stateful test of the release machine against a real service on the process target:
seeded random sequences of register (good, smoke-failing, canary, behind an approval gate),
approve/reject, stop, rollback, restart of the service (SIGTERM or kill -9) and kill -9 of a
scoring process. After every step, once the service is quiet, it checks:

- the router's live table equals the store's traffic, endpoint by endpoint;
- traffic names only live (serving) deployments;
- a rollback restores the traffic recorded before the release it undoes, and a release that
  failed or was stopped left traffic as it found it;
- no deployment named by the current or the previous traffic is stopped;
- no release is left in a non-final phase without a worker or a gate.

Bounded: ``MODELCD_STATEFUL_STEPS`` steps (default 100; a soak run sets more) within ``MODELCD_STATEFUL_BUDGET_S``
(default 900 s; a machine so loaded that fewer than 50 steps fit fails), seed
``MODELCD_STATEFUL_SEED`` (default: fixed, so a failure reproduces); the step log is in the
assertion message."""

from __future__ import annotations

import os
import random
import signal
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest
import requests

from tests.conftest import Service, iris_model, running_service

# the suite runs a bounded walk (100 steps, ~2 min); a soak run sets e.g. MODELCD_STATEFUL_STEPS=1000
STEPS = int(os.environ.get("MODELCD_STATEFUL_STEPS", "100"))
BUDGET_S = float(os.environ.get("MODELCD_STATEFUL_BUDGET_S", "900"))  # a loaded machine stops early (≥ 50 steps)
SEED = int(os.environ.get("MODELCD_STATEFUL_SEED", "20261205"))
ACTIVE = {"building", "deploying", "smoke_testing", "promoting", "rolling_back", "queued"}

POLICIES = ["""\
name: sm-blue-green
match: {models: ["smbg"]}
environments: [{name: production, scoring_workers: 1}]
smoke: {requests: 2}
retention: {keep_deployments: 2}
""", """\
name: sm-canary
match: {models: ["smcn"]}
environments:
  - {name: production, scoring_workers: 1, strategy: canary, steps: [50, 100], step_hold_s: 0.3, max_error_rate: 1}
smoke: {requests: 2}
retention: {keep_deployments: 3}
""", """\
name: sm-gate
match: {models: ["smgt"]}
environments: [{name: production, scoring_workers: 1, approval: true}]
smoke: {requests: 2}
"""]
MODELS = ("smbg", "smcn", "smgt")


class Machine:
    """Drives the service and checks the invariants; ``log`` is the sequence so far."""

    def __init__(self, svc: Service, tmp: Path, rng: random.Random) -> None:
        self.svc, self.tmp, self.rng = svc, tmp, rng
        self.log: list[str] = []
        self.folders = 0

    # -- reading -------------------------------------------------------------------------

    def endpoint(self, model: str) -> dict[str, Any] | None:
        r = self.svc.api("GET", f"/endpoints/{model}/production")
        return r.json() if r.status_code == 200 else None

    def deployments(self) -> dict[str, dict[str, Any]]:
        return {d["id"]: d for d in self.svc.api("GET", "/deployments", params={"limit": "1000"})
                .json()["deployments"]}

    def releases(self) -> list[dict[str, Any]]:
        return self.svc.api("GET", "/releases", params={"limit": "1000"}).json()["releases"]

    def split(self, model: str) -> dict[str, int]:
        ep = self.endpoint(model)
        return {d: w for d, w in (ep or {}).get("deployments", {}).items() if w > 0}

    # -- steps ---------------------------------------------------------------------------

    def register(self, model: str, good: bool = True) -> dict[str, Any]:
        self.folders += 1
        folder = self.tmp / f"m{self.folders}"
        meta = iris_model(folder, c=self.rng.choice([0.05, 0.2, 1.0]), expected_offset=0 if good else 1)
        return self.svc.register(model, folder, meta)

    def release_of(self, model: str, version: int) -> dict[str, Any]:
        rel = self.svc.client.find_release(model, version)
        assert rel is not None, f"no release of {model} v{version}"
        return rel

    def free_gate(self, model: str) -> None:
        """A release waiting at its gate holds the endpoint (newer ones queue): answer it first."""
        if any(r["phase"] == "awaiting_approval" and r["model"] == model for r in self.releases()):
            self.step_answer_gate(approve=self.rng.random() < 0.5, model=model)

    def step_register(self, model: str, good: bool) -> None:
        self.free_gate(model)
        before = self.endpoint(model)
        v = self.register(model, good)
        rel = self.svc.client.wait_release(self.release_of(model, v["version"])["id"], timeout_s=180)
        self.log.append(f"register {model} v{v['version']} good={good} → {rel['phase']}")
        after = self.endpoint(model)
        if rel["phase"] == "succeeded":
            assert after is not None and after["traffic"] == {str(v["version"]): 100}, after
            if before is not None and self.positive(before["deployments"]) != self.positive(after["deployments"]):
                assert self.positive(after["previous_traffic"] or {}) == self.positive(before["deployments"]), \
                    "a promotion must record the split it replaced"
        elif rel["phase"] == "awaiting_approval":
            assert model == "smgt"
            assert (after or {}).get("deployments") == (before or {}).get("deployments")
        else:
            assert not good or rel["phase"] == "failed", rel
            assert (after or {}).get("deployments") == (before or {}).get("deployments"), "failure moved traffic"

    @staticmethod
    def positive(split: dict[str, int]) -> dict[str, int]:
        return {d: w for d, w in split.items() if w > 0}

    def step_answer_gate(self, approve: bool, model: str | None = None) -> None:
        waiting = [r for r in self.releases() if r["phase"] == "awaiting_approval" and model in (None, r["model"])]
        if not waiting:
            self.log.append("answer gate: none waiting")
            return
        rel = waiting[0]
        before = self.endpoint(rel["model"])
        r = self.svc.api("POST", f"/releases/{rel['id']}/{'approve' if approve else 'reject'}", json={"comment": "sm"})
        assert r.status_code == 200, r.text
        done = self.svc.client.wait_release(rel["id"], timeout_s=120)
        self.log.append(f"{'approve' if approve else 'reject'} {rel['model']} v{rel['version']} → {done['phase']}")
        assert done["phase"] == ("succeeded" if approve else "failed"), done
        if not approve:
            assert (self.endpoint(rel["model"]) or {}).get("deployments") == (before or {}).get("deployments")

    def step_stop(self, model: str) -> None:
        self.free_gate(model)
        before = self.endpoint(model)
        v = self.register(model)
        rel = self.release_of(model, v["version"])
        time.sleep(self.rng.choice([0.0, 0.3, 0.8]))
        r = self.svc.api("POST", f"/releases/{rel['id']}/stop")
        done = self.svc.client.wait_release(rel["id"], timeout_s=180)
        self.log.append(f"stop {model} v{v['version']} ({r.status_code}) → {done['phase']}")
        if done["phase"] == "awaiting_approval":  # the stop reached the gate: it ends it
            done = self.svc.client.wait_release(rel["id"], timeout_s=60)
        if done["phase"] in ("cancelled", "failed"):
            assert (self.endpoint(model) or {}).get("deployments") == (before or {}).get("deployments")

    def step_rollback(self, model: str) -> None:
        before = self.endpoint(model)
        r = self.svc.api("POST", f"/endpoints/{model}/production/rollback")
        self.log.append(f"rollback {model} → {r.status_code} {r.json().get('traffic') or r.json().get('message')}")
        if before is None:
            assert r.status_code == 404, r.text
            return
        previous = self.positive(before["previous_traffic"] or {})
        if r.status_code == 409:
            assert not previous or previous == self.positive(before["deployments"]) or r.json()["message"]
            return
        assert r.status_code == 200, r.text
        if r.json()["release_id"] is None:  # instant: what served before the last release began
            after = self.endpoint(model)
            assert after is not None and self.positive(after["deployments"]) == previous, (before, after)
            assert self.positive(after["previous_traffic"] or {}) == self.positive(before["deployments"])
        else:
            self.svc.client.wait_release(r.json()["release_id"], timeout_s=180)

    def step_restart(self) -> None:
        hard = self.rng.random() < 0.5
        (self.svc.kill9 if hard else self.svc.stop)()
        self.svc.start()
        self.log.append(f"restart ({'kill -9' if hard else 'SIGTERM'})")

    def step_kill_scoring(self) -> None:
        live = [d for d in self.deployments().values() if d["state"] in ("serving", "standby") and d["pid"]]
        if not live:
            self.log.append("kill scoring: none live")
            return
        d = self.rng.choice(live)
        try:
            os.killpg(d["pid"], signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.log.append(f"kill -9 {d['model']} v{d['version']} ({d['state']}, pid {d['pid']})")

    # -- invariants ----------------------------------------------------------------------

    def quiet(self, timeout_s: float = 120) -> None:
        """Wait until no release is between phases and every kept deployment runs again."""
        deadline = time.monotonic() + timeout_s
        while True:
            busy = [r for r in self.releases() if r["phase"] in ACTIVE]
            dead = [d for d in self.deployments().values() if d["state"] in ("serving", "standby")
                    and not _running(d["pid"])]
            if not busy and not dead:
                return
            assert time.monotonic() < deadline, f"not quiet: releases {busy}, dead deployments {dead}"
            time.sleep(0.2)

    def check(self) -> None:
        self.quiet()
        deps = self.deployments()
        table = requests.get(f"{self.svc.router_url}/-/table", timeout=10).json()["endpoints"]
        for model in MODELS:
            ep = self.endpoint(model)
            if ep is None:
                continue
            split = self.positive(ep["deployments"])
            live = {b["id"]: b["weight"] for b in table[f"{model}/production"]["backends"] if b["weight"] > 0}
            assert live == split, f"router {live} != store {split} for {model}"
            for dep_id in split:
                assert deps[dep_id]["state"] == "serving", (model, deps[dep_id])
            for dep_id in set(ep["deployments"]) | set(ep["previous_traffic"] or {}):
                assert deps[dep_id]["state"] in ("serving", "standby"), (model, dep_id, deps[dep_id]["state"])


def _running(pid: int | None) -> bool:
    try:
        return bool(pid) and psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


@pytest.fixture
def machine(tmp_path: Path) -> Iterator[Machine]:
    with running_service(tmp_path) as svc:
        for text in POLICIES:
            svc.apply_policy(text)
        yield Machine(svc, tmp_path / "models", random.Random(SEED))


@pytest.mark.timeout(BUDGET_S + 600)
def test_random_sequences_keep_the_release_machine_invariants(machine: Machine) -> None:
    m = machine
    steps: list[tuple[float, Callable[[], None]]] = [
        (5, lambda: m.step_register(m.rng.choice(MODELS), good=True)),
        (2, lambda: m.step_register(m.rng.choice(MODELS), good=False)),
        (2, lambda: m.step_answer_gate(approve=m.rng.random() < 0.6)),
        (2, lambda: m.step_stop(m.rng.choice(MODELS))),
        (4, lambda: m.step_rollback(m.rng.choice(MODELS))),
        (1, m.step_restart),
        (2, m.step_kill_scoring),
    ]
    weights = [w for w, _ in steps]
    deadline = time.monotonic() + BUDGET_S
    for i in range(STEPS):
        if time.monotonic() > deadline:
            assert i >= min(50, STEPS), f"only {i} steps within {BUDGET_S:g}s"
            break
        _, step = m.rng.choices(steps, weights=weights)[0]
        try:
            step()
            m.check()
        except Exception as e:
            raise AssertionError(f"step {i} (seed {SEED}) broke an invariant: {e}\nsteps so far:\n"
                                 + "\n".join(m.log[-40:])) from e
