"""Docker target timings on a real engine, side by side with the process target:

- cold image build with the wheels cached (the wheelhouse is there, no layer cache, no
  dependencies image): the venv built on the host (``dependencies: auto``) side by side with
  the old recipe (pip inside the engine, ``pip``) and the fallback (uv inside the engine,
  ``engine``), interleaved; the host recipe with an empty uv cache and in a fresh home (the
  wheelhouse filled first); a process bundle in a fresh home;
- warm build (a new version with the same requirements: only the model layer is new), next to
  the process target's bundle build of the same version;
- register → serving through a real `modelcd serve` (warm: the wheelhouse and layers of the
  previous version are there), a docker-target model and a process-target model alternately;
- rollback: from the API call to the endpoint answering with the other version.

Usage: python bench/docker_bench.py [--cold 3] [--warm 5] [--versions 5] [--switches 20]
       [--base-image modelcd/python:3.11-bookworm] [--no-releases]
Needs a Docker engine (scripts/docker-engine). Prints markdown tables. Loopback only; every
loop is bounded.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from modelcd.builders.base_image import build_base_image
from modelcd.builders.bundle import build_bundle
from modelcd.builders.image import ImageOptions, build_image
from modelcd.config import load_settings
from modelcd.domain import Flavor, ModelVersion
from modelcd.quickstart import make_model
from modelcd.targets.docker import DockerTarget
from release_bench import row, start_service, stop_service, wait_version  # bench/ is on sys.path when run as a script

POLICY = """\
name: bench-docker
match: {models: ["dk-*"]}
environments:
  - name: production
    target: docker
    scoring_workers: 1
    auth: none  # the bench times releases, not keys (loopback only)
smoke: {requests: 5}
"""
PROCESS_POLICY = """\
name: bench-process
match: {models: ["pr-*"]}
environments:
  - name: production
    target: process
    scoring_workers: 1
    auth: none  # the bench times releases, not keys (loopback only)
smoke: {requests: 5}
"""


def version_of(folder: Path, model: str, number: int, c: float) -> ModelVersion:
    meta = make_model(folder, c)
    return ModelVersion(model=model, version=number, digest=f"{number:04d}{int(c * 1e6):060d}", flavor=Flavor.SKLEARN,
                        model_file="model.joblib", entry_script=None,
                        requirements=tuple((folder / "requirements.txt").read_text().split()),
                        sample=meta["sample"], expected=meta["expected"])


def timed(fn: Any, *args: Any) -> float:
    t0 = time.monotonic()
    fn(*args)
    return time.monotonic() - t0


RECIPES = {"auto": "host venv (auto)", "pip": "old recipe: pip inside the engine", "engine": "uv inside the engine"}


def builds(tmp: Path, base: str, cold: int, warm: int) -> None:
    quiet, cancel = (lambda _: None), threading.Event()
    cold_by: dict[str, list[float]] = {mode: [] for mode in RECIPES}
    cold_uv, cold_fresh, cold_bundle, warm_image, warm_bundle = [], [], [], [], []
    cached = tmp / "cold-cached"  # one home: its wheelhouse is filled before the timed builds
    first = version_of(tmp / "cold-files", "bench", 1, 1.0)
    build_image(cached, first, tmp / "cold-files", ImageOptions(base_image=base, repository="modelcd-bench"), quiet,
                cancel)
    for i in range(cold):
        v = version_of(tmp / f"cold-files-{i}", "bench", 2 + i, 1.0 + i)
        files = tmp / f"cold-files-{i}"
        for mode in RECIPES:  # interleaved, so the machine's load hits each alike; no layer cache for any
            options = ImageOptions(base_image=base, repository=f"modelcd-bench-{mode}", no_cache=True,
                                   dependencies=mode)
            cold_by[mode].append(timed(build_image, cached, v, files, options, quiet, cancel))
        os.environ["UV_CACHE_DIR"] = str(tmp / f"uv-cache-{i}")  # uv unpacks every wheel again
        try:
            options = ImageOptions(base_image=base, repository="modelcd-bench-uv", no_cache=True)
            cold_uv.append(timed(build_image, cached, v, files, options, quiet, cancel))
        finally:
            del os.environ["UV_CACHE_DIR"]
        home = tmp / f"cold-{i}"  # a fresh home: empty wheelhouse and venv cache
        options = ImageOptions(base_image=base, repository="modelcd-bench-fresh", no_cache=True)
        cold_fresh.append(timed(build_image, home, v, files, options, quiet, cancel))
        cold_bundle.append(timed(build_bundle, home, v, files, quiet, cancel))
    home = tmp / "warm"
    options = ImageOptions(base_image=base, repository="modelcd-bench")
    first = version_of(tmp / "warm-files-1", "bench", 1, 1.0)
    build_image(home, first, tmp / "warm-files-1", options, quiet, cancel)
    build_bundle(home, first, tmp / "warm-files-1", quiet, cancel)
    for i in range(2, warm + 2):
        v = version_of(tmp / f"warm-files-{i}", "bench", i, 1.0 / i)
        files = tmp / f"warm-files-{i}"
        warm_image.append(timed(build_image, home, v, files, options, quiet, cancel))
        warm_bundle.append(timed(build_bundle, home, v, files, quiet, cancel))
    print("| build | n | median | p90 | p99 | min | max |")
    print("|---|---|---|---|---|---|---|")
    for mode, name in RECIPES.items():
        print(row(f"cold, wheels cached: docker image, {name}", cold_by[mode], "s", 1))
    print(row("cold, wheels cached: docker image, host venv, empty uv cache", cold_uv, "s", 1))
    print(row("cold: docker image, host venv, fresh home (wheelhouse filled)", cold_fresh, "s", 1))
    print(row("cold: process bundle (new venv), fresh home", cold_bundle, "s", 1))
    print(row("warm: docker image, new version, same requirements", warm_image, "s", 1))
    print(row("warm: process bundle, same versions", warm_bundle))
    old, new = statistics.median(cold_by["pip"]), statistics.median(cold_by["auto"])
    print(f"\ncold with the wheels cached, medians: host venv {new:.1f} s, old recipe {old:.1f} s "
          f"({old / new:.1f}x faster)\n")


def releases(tmp: Path, base: str, versions: int, switches: int) -> None:
    proc, env, client = start_service(tmp, MODELCD_DOCKER_BASE_IMAGE=base, MODELCD_DOCKER_NETWORK="host",
                                      MODELCD_DOCKER_REPOSITORY="modelcd-bench")
    settings = load_settings(environ=env)
    try:
        for text in (POLICY, PROCESS_POLICY):
            client.request("PUT", "/api/v1/policies", data=text.encode(), headers={"Content-Type": "application/yaml"})
        reg: dict[str, list[float]] = {"dk-bench": [], "pr-bench": []}
        sample: dict[str, Any] = {}
        for model in reg:  # v1: cold (not measured)
            meta = make_model(tmp / model / "v1", 1.0)
            sample = meta["sample"]
            client.register(model, tmp / model / "v1", meta)
            rel = client.find_release(model, 1)
            assert rel and client.wait_release(rel["id"])["phase"] == "succeeded", rel
        for i in range(2, versions + 2):
            for model in reg:
                meta = make_model(tmp / model / f"v{i}", 1.0 / i)
                uri = client.get(f"/api/v1/endpoints/{model}/production")["scoring_uri"]
                client.register(model, tmp / model / f"v{i}", meta)
                t0 = time.monotonic()
                reg[model].append(wait_version(uri, sample, i) - t0)
                rel = client.find_release(model, i)
                assert rel and client.wait_release(rel["id"])["phase"] == "succeeded", rel
        switch: dict[str, list[float]] = {"dk-bench": [], "pr-bench": []}
        current = {m: versions + 1 for m in switch}
        for _ in range(switches):
            for model in switch:
                uri = client.get(f"/api/v1/endpoints/{model}/production")["scoring_uri"]
                t0 = time.monotonic()
                result = client.post(f"/api/v1/endpoints/{model}/production/rollback")
                assert result["release_id"] is None, result
                other = versions if current[model] == versions + 1 else versions + 1
                switch[model].append(wait_version(uri, sample, other) - t0)
                current[model] = other
        print("| release | n | median | p90 | p99 | min | max |")
        print("|---|---|---|---|---|---|---|")
        print(row("register → serving, docker target (warm)", reg["dk-bench"], "s", 1))
        print(row("register → serving, process target (warm)", reg["pr-bench"], "s", 1))
        print(row("rollback → endpoint answers other version, docker", switch["dk-bench"]))
        print(row("rollback → endpoint answers other version, process", switch["pr-bench"]))
    finally:
        stop_service(proc, env)
        import docker

        engine = docker.from_env()
        instance = DockerTarget(settings.home).instance
        for container in engine.containers.list(all=True, filters={"label": f"io.modelcd.instance={instance}"}):
            container.remove(force=True)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--cold", type=int, default=3)
    ap.add_argument("--warm", type=int, default=5)
    ap.add_argument("--versions", type=int, default=5)
    ap.add_argument("--switches", type=int, default=20)
    ap.add_argument("--base-image", default="modelcd/python:3.11-bookworm")
    ap.add_argument("--no-releases", action="store_true", help="time the builds only")
    args = ap.parse_args()
    import docker

    try:
        docker.from_env().images.get(args.base_image)
    except docker.errors.ImageNotFound:
        print(f"building base image {args.base_image}", file=sys.stderr)
        build_base_image(args.base_image, "bookworm", None, None, lambda _: None, threading.Event())
    engine = docker.from_env()
    before = {image.id for image in engine.images.list(all=True)} | {engine.images.get(args.base_image).id}
    tmp = Path(tempfile.mkdtemp(prefix="modelcd-docker-bench-"))
    try:
        builds(tmp, args.base_image, args.cold, args.warm)
        if not args.no_releases:
            releases(tmp, args.base_image, args.versions, args.switches)
    finally:  # the images this run built go (the base image stays for the next run)
        for _ in range(3):  # children first: an image with dependent children goes on a later pass
            for image in engine.images.list(all=True):
                if image.id not in before:
                    with contextlib.suppress(docker.errors.APIError):
                        engine.images.remove(image.id, force=True)


if __name__ == "__main__":
    main()
