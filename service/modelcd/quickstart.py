"""``modelcd quickstart``: the five-minute tour on the embedded default.

Starts the service (unless one already answers), registers an sklearn model trained on
scikit-learn's bundled iris data, follows its release to production, scores through the
endpoint URI, then registers a second version and shows the blue-green switch."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import click
import requests

from modelcd.client import Client
from modelcd.config import Settings
from modelcd.errors import ModelcdError

MODEL = "iris"


def make_model(folder: Path, c: float) -> dict[str, Any]:
    """Train a LogisticRegression on iris into ``folder``; return registration metadata."""
    import joblib
    import sklearn
    from sklearn.datasets import load_iris
    from sklearn.linear_model import LogisticRegression

    x, y = load_iris(return_X_y=True)
    model = LogisticRegression(C=c, max_iter=500).fit(x, y)
    folder.mkdir(parents=True, exist_ok=True)
    joblib.dump(model, folder / "model.joblib")
    (folder / "requirements.txt").write_text(f"scikit-learn=={sklearn.__version__}\n")
    rows = x[[0, 60, 120, 70]].tolist()
    return {"flavor": "sklearn", "sample": {"data": rows}, "expected": model.predict(rows).tolist(),
            "tags": {"dataset": "iris", "C": str(c)}, "description": f"LogisticRegression(C={c}) on iris",
            "metrics": {"train_accuracy": float(model.score(x, y))}}


def _start_service(settings: Settings) -> subprocess.Popen[bytes]:
    settings.home.mkdir(parents=True, exist_ok=True)
    log = open(settings.home / "serve.log", "ab")  # noqa: SIM115 - handed to the child
    proc = subprocess.Popen([sys.executable, "-m", "modelcd", "serve"], stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True, env=os.environ.copy())
    deadline = time.monotonic() + 60
    client = Client(settings)
    while not client.healthy():
        if proc.poll() is not None:
            raise ModelcdError(f"`modelcd serve` exited ({proc.returncode}); see {settings.home / 'serve.log'}")
        if time.monotonic() > deadline:
            raise ModelcdError(f"`modelcd serve` did not answer in 60 s; see {settings.home / 'serve.log'}")
        time.sleep(0.2)
    return proc


def _release(client: Client, meta: dict[str, Any], folder: Path) -> tuple[dict[str, Any], float]:
    t0 = time.monotonic()
    version = client.register(MODEL, folder, meta)
    click.echo(f"registered {MODEL} v{version['version']} (digest {version['digest'][:12]})")
    rel = client.find_release(MODEL, version["version"])
    if rel is None:
        raise ModelcdError("no release was started for the new version; check `modelcd policies list`")

    def show(r: dict[str, Any]) -> None:
        click.echo(f"  {time.monotonic() - t0:6.1f}s  {r['phase']}")

    rel = client.wait_release(rel["id"], show)
    if rel["phase"] != "succeeded":
        raise ModelcdError(f"release {rel['id']} {rel['phase']}: {rel.get('error')}")
    return version, time.monotonic() - t0


def _key(client: Client) -> str:
    """A key of the endpoint: shown when made; on a second tour the secondary is made anew."""
    path = f"/api/v1/endpoints/{MODEL}/production/keys"
    keys = client.post(path, json={})
    if keys["primary"] is None:
        click.echo("   (its keys were shown on an earlier run; making a new secondary key)")
        keys = client.post(path, json={"regenerate": "secondary"})
        return str(keys["secondary"])
    return str(keys["primary"])


def _score(uri: str, key: str, body: dict[str, Any]) -> tuple[str, Any]:
    resp = requests.post(f"{uri}/score", json=body, headers={"Authorization": f"Bearer {key}"}, timeout=10)
    resp.raise_for_status()
    return resp.headers.get("X-Modelcd-Version", "?"), resp.json()["predictions"]


def run(settings: Settings, exit_after: bool) -> int:
    click.echo(f"modelcd quickstart — home {settings.home.resolve()}")
    client = Client(settings)
    proc = None
    if client.healthy():
        click.echo(f"using the modelcd service already running at {settings.url}")
    else:
        click.echo(f"starting `modelcd serve` on {settings.url} (log: {settings.home / 'serve.log'})")
        proc = _start_service(settings)
        client = Client(settings)
    try:
        work = settings.home / "quickstart"
        click.echo("\n1. version 1: LogisticRegression(C=1.0) on iris — build, deploy, smoke, promote")
        meta1 = make_model(work / "v1", 1.0)
        _, took = _release(client, meta1, work / "v1")
        ep = client.get(f"/api/v1/endpoints/{MODEL}/production")
        click.echo(f"   in production after {took:.1f} s. Endpoint (stable across versions):\n     {ep['scoring_uri']}")
        body = {"data": meta1["sample"]["data"][:2]}
        key = _key(client)
        click.echo(f"   its keys: `modelcd endpoints keys {MODEL} --env production` (shown once; this is one):"
                   f"\n     {key}")
        click.echo(f"   try it:\n     curl -s -X POST {ep['scoring_uri']} -H 'Content-Type: application/json' "
                   f"-H 'Authorization: Bearer {key}' -d '{json.dumps(body)}'")
        served, preds = _score(ep["uri"], key, body)
        click.echo(f"   → v{served} answered {preds}")

        click.echo("\n2. version 2: LogisticRegression(C=0.05) — same requirements, so the environment is reused")
        meta2 = make_model(work / "v2", 0.05)
        click.echo(f"   traffic before: {ep['traffic']}")
        _, took = _release(client, meta2, work / "v2")
        ep = client.get(f"/api/v1/endpoints/{MODEL}/production")
        click.echo(f"   traffic after:  {ep['traffic']}  (switched in one step after smoke checks; "
                   f"v1 stays warm for `modelcd rollback {MODEL} --env production`)")
        served, preds = _score(ep["uri"], key, body)
        click.echo(f"   → v{served} answered {preds}  ({took:.1f} s from register to serving)")
        click.echo("\nsee it all: modelcd releases list · modelcd jobs list · modelcd endpoints list")
        if exit_after:
            return 0
        click.echo("\nserving; press Ctrl-C to stop everything")
        try:
            while True:
                time.sleep(3600)
        except KeyboardInterrupt:
            click.echo("")
        return 0
    except ModelcdError as e:
        click.echo(f"quickstart failed: {e.message}", err=True)
        return 1
    finally:
        if proc is not None:
            proc.send_signal(signal.SIGTERM)
            proc.wait(timeout=30)
            from modelcd.lifecycle import stop_data_plane

            for line in stop_data_plane(settings):
                click.echo(line)
