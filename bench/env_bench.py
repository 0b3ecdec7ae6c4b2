"""New requirements, wheels already cached (issue 14): how long until a new environment is
ready, modelcd's build (``builders.bundle.ensure_env``: uv installs from its cache as links,
what serving imports is imported once, the rest compiled in the background) side by side with
the recipe it replaced (``uv pip install --compile-bytecode``), rounds alternating, each in a
fresh temporary home so that every environment is new while uv's cache holds the wheels.

    python bench/env_bench.py [--rounds 5] [--requirements scikit-learn==1.7.2 ...]

Per round and recipe: *ready* is the build's wall time (what a release waits for); *first
import* is a fresh interpreter of the new environment importing what a scoring process imports
(scikit-learn's stack and the scoring server) right after, so a build that left compiling to
later pays nothing hidden there; *background* is how long modelcd's detached compile ran
after the build returned (the next round starts once it ended). Loopback only: uv reads its
cache and the package index's metadata.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from modelcd.builders.bundle import (  # noqa: E402 - after the path setup
    SERVING_MODULES,
    _copy_runtime,
    ensure_env,
    env_key,
    find_uv,
    normalise_requirements,
    python_identity,
    resolve_python,
    runtime_requirements,
)
from modelcd.builders.imports import heavy_modules  # noqa: E402


def ours(home: Path, requirements: list[str], interpreter: Path) -> float:
    key = env_key(python_identity(interpreter), requirements, [])
    started = time.monotonic()
    ensure_env(home, key, requirements, interpreter, lambda _line: None, threading.Event())
    return time.monotonic() - started


def old_recipe(home: Path, requirements: list[str], interpreter: Path) -> float:
    """What the build did before: a uv venv and an install that byte-compiles everything."""
    uv = find_uv()
    assert uv, "uv is needed"
    env = home / "envs" / "old"
    reqs = home / "requirements.txt"
    reqs.write_text("".join(f"{r}\n" for r in requirements))
    started = time.monotonic()
    subprocess.run([uv, "venv", "--relocatable", "--python", str(interpreter), str(env)], check=True,
                   capture_output=True)
    subprocess.run([uv, "pip", "install", "--compile-bytecode", "--python", str(env / "bin" / "python"), "-r",
                    str(reqs)], check=True, capture_output=True)
    return time.monotonic() - started


def first_import(home: Path, modules: list[str]) -> float:
    """A fresh interpreter of the home's only environment importing ``modules`` (bytecode writing
    off, as a scoring process under PYTHONDONTWRITEBYTECODE would be)."""
    python = next((home / "envs").glob("*/bin/python"))
    with tempfile.TemporaryDirectory(prefix="env-bench-rt-") as rt:
        _copy_runtime(Path(rt) / "rt")
        env = {**os.environ, "PYTHONPATH": str(Path(rt) / "rt"), "PYTHONDONTWRITEBYTECODE": "1"}
        code = "import importlib, sys\nfor m in sys.argv[1:]:\n    importlib.import_module(m)\n"
        started = time.monotonic()
        subprocess.run([str(python), "-c", code, *modules], check=True, env=env, capture_output=True)
        return time.monotonic() - started


def wait_background(home: Path) -> float:
    """Seconds until no compileall of ``home``'s environments runs any more."""
    started = time.monotonic()
    while any("compileall" in " ".join(p.info["cmdline"] or []) and str(home) in " ".join(p.info["cmdline"] or [])
              for p in psutil.process_iter(["cmdline"])):
        time.sleep(0.2)
    return time.monotonic() - started


def main() -> None:
    import sklearn

    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--requirements", nargs="*", default=[f"scikit-learn=={sklearn.__version__}"])
    args = parser.parse_args()
    interpreter = resolve_python(None)
    requirements = normalise_requirements(args.requirements) + runtime_requirements()
    modules = [*SERVING_MODULES, *heavy_modules(requirements)]
    print(f"requirements: {' '.join(requirements)}; {os.cpu_count()} CPUs; load average at start "
          f"{' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    with tempfile.TemporaryDirectory(prefix="env-bench-warmup-") as tmp:  # the wheels into uv's cache
        ours(Path(tmp), requirements, interpreter)
        wait_background(Path(tmp))
    rows: dict[str, list[tuple[float, float, float]]] = {"modelcd": [], "old": []}
    for i in range(args.rounds):
        for name in (["modelcd", "old"] if i % 2 == 0 else ["old", "modelcd"]):
            with tempfile.TemporaryDirectory(prefix="env-bench-") as tmp:
                home = Path(tmp)
                ready = (ours if name == "modelcd" else old_recipe)(home, requirements, interpreter)
                imported = first_import(home, modules)
                background = wait_background(home) if name == "modelcd" else 0.0
                rows[name].append((ready, imported, background))
                print(f"round {i + 1} {name}: ready {ready:.2f} s, first import {imported:.2f} s"
                      + (f", background compile {background:.1f} s after" if name == "modelcd" else ""), flush=True)
    print("\n| recipe | rounds | ready p50 | min | max | first import p50 | background compile p50 |\n"
          "|---|---:|---:|---:|---:|---:|---:|")
    for name, label in (("modelcd", "modelcd (links, what serving imports compiled, the rest later)"),
                        ("old", "before: `uv pip install --compile-bytecode`")):
        ready = [r[0] for r in rows[name]]
        print(f"| {label} | {len(ready)} | {statistics.median(ready):.2f} s | {min(ready):.2f} s | {max(ready):.2f} s "
              f"| {statistics.median(r[1] for r in rows[name]):.2f} s | "
              + (f"{statistics.median(r[2] for r in rows[name]):.1f} s |" if name == "modelcd" else "— |"))
    ratio = statistics.median(r[0] for r in rows["old"]) / statistics.median(r[0] for r in rows["modelcd"])
    print(f"\nready: before / modelcd = {ratio:.1f}x")


if __name__ == "__main__":
    main()
