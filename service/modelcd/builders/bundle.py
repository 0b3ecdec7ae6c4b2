"""Build stage of the ``process`` target: a bundle is a shared virtualenv plus a folder with
the model files, the scoring runtime and its settings.

Layout under ``home``::

    envs/{env_key}/                     virtualenv, shared by every bundle with the same key
    bundles/{model}/{version}-{digest12}/
        model/                          copy of the version's files
        runtime/modelcd/...             modelcd/__init__.py + modelcd/scoring (copied)
        scoring.json                    what the scoring runtime needs to know
        bundle.json                     python, env key, created time
    locks/env-{env_key}.lock            fcntl lock held while that env is built

Everything is written into a temporary beside its final name and renamed into place
(``fsutil.atomic_dir``), so a crash never leaves a half-built env or bundle under its final
name, a re-run is idempotent, and ``fsutil.clean_temporaries`` finds what a crash left.
Registry-supplied strings never reach a shell: subprocesses get argv lists and the
requirements go through a file.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import importlib
import json
import os
import platform
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from datetime import UTC, datetime
from pathlib import Path
from queue import Empty, Queue

import yaml

import modelcd
from modelcd.builders.base import Builder, BuildSpec
from modelcd.builders.imports import heavy_modules
from modelcd.domain import Bundle, Flavor, ModelVersion
from modelcd.errors import BuildError, Cancelled
from modelcd.fsutil import atomic_dir, remove_abandoned, temp_file, write_atomic
from modelcd.inherited import inherited_env
from modelcd.registry.requirements import python_minor

Log = Callable[[str], None]

DEFAULT_RUNTIME_REQUIREMENTS = ("gunicorn>=22",)
ENV_MARKER = "modelcd-env.json"  # written last inside an env: its presence means "complete"
BUNDLE_MARKER = "bundle.json"
_SAFE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
_REQ_NAME = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)(.*)$", re.DOTALL)
_POLL_S = 0.1
# what a pyfunc model's environment must import: the scoring server (gunicorn, uvicorn) and
# the parts of MLflow the pyfunc flavor uses (scoring/pyfunc.py)
PYFUNC_PROBE = ("modelcd.scoring.server", "mlflow.pyfunc", "mlflow.pyfunc.scoring_server",
                "mlflow.utils.proto_json_utils")
# what every scoring process imports from the runtime and the server stack (compiled at build)
SERVING_MODULES = ("modelcd.scoring.server", "modelcd.scoring.batch", "gunicorn.arbiter", "gunicorn.workers.base",
                   "uvicorn", "uvicorn.protocols.http.httptools_impl", "uvicorn.loops.asyncio")


def build_bundle(home: Path, version: ModelVersion, files_dir: Path, log: Log,
                 cancel: threading.Event, python: str | None = None) -> Bundle:
    """Build (or reuse) the bundle of ``version`` from its files in ``files_dir``.

    Blocks until the bundle is complete. Idempotent: a complete bundle for the same
    (model, version, digest) is returned as is, and its virtualenv is shared with every
    version that has the same interpreter and requirements. Raises BuildError naming the
    cause (bad entry script, uninstallable requirement, missing file) and Cancelled when
    ``cancel`` is set; in both cases nothing half-built is left behind.
    """
    home = Path(home).absolute()  # bundle.json and Bundle hold paths used from other cwds
    check_cancel(cancel)
    check_name(version.model, "model name")
    reqs = normalise_requirements(version.requirements)
    check_files(version, Path(files_dir))
    interpreter = resolve_python(python)
    probe: tuple[str, ...] = ()
    if version.flavor == Flavor.PYFUNC:
        interpreter = pyfunc_interpreter(Path(files_dir), version, interpreter, log)
        probe = (*PYFUNC_PROBE, *loader_module(Path(files_dir), version))
    key = env_key(python_identity(interpreter), reqs, runtime_requirements())
    env_python, reused = ensure_env(home, key, [*reqs, *runtime_requirements()], interpreter, log, cancel,
                                    probe=probe)
    bundle = _ensure_bundle_dir(home, version, Path(files_dir), env_python, key, log, cancel)
    return Bundle(path=bundle, python=env_python, env_key=key, reused_env=reused)


class BundleBuilder(Builder):
    """The ``process`` target's builder: ``build_bundle`` under ``home``, its virtualenvs made
    with ``python`` (None: the interpreter running modelcd)."""

    def __init__(self, home: Path, python: str | None = None) -> None:
        self.home = home
        self.python = python

    def build(self, spec: BuildSpec, log: Log, cancel: threading.Event) -> Bundle:
        return build_bundle(self.home, spec.version, spec.files_dir, log, cancel, python=self.python)


# -- pure helpers -------------------------------------------------------------------------


def normalise_requirements(requirements: Sequence[str]) -> list[str]:
    """Sorted, de-duplicated requirement lines with PEP 503 names; refuse installer options
    and line breaks, which would let a registry string steer the installer."""
    out: set[str] = set()
    for raw in requirements:
        if "\n" in raw or "\r" in raw or "\x00" in raw:
            raise BuildError(f"requirement {raw!r} spans several lines; give one requirement per entry",
                             field="requirements")
        line = " ".join(raw.split())
        if not line or line.startswith("#"):
            continue
        if line.startswith("-"):
            raise BuildError(f"requirement {line!r} is an installer option; only package requirements "
                             "are allowed (configure indexes with UV_* / PIP_* variables instead)",
                             field="requirements")
        match = _REQ_NAME.match(line)
        if not match:
            raise BuildError(f"requirement {line!r} does not start with a package name", field="requirements")
        name, rest = match.groups()
        out.add(re.sub(r"[-_.]+", "-", name).lower() + rest)
    return sorted(out)


def env_key(python_id: str, requirements: Sequence[str], runtime: Sequence[str]) -> str:
    """sha256 over the interpreter identity, the model's and the runtime's requirements."""
    doc = json.dumps({"python": python_id, "requirements": sorted(requirements),
                      "runtime": sorted(normalise_requirements(runtime))}, sort_keys=True)
    return hashlib.sha256(doc.encode()).hexdigest()


def runtime_requirements() -> list[str]:
    """What the scoring runtime itself needs inside every env (``modelcd.scoring``)."""
    try:
        scoring = importlib.import_module("modelcd.scoring")
    except ImportError:
        return list(DEFAULT_RUNTIME_REQUIREMENTS)
    return list(getattr(scoring, "RUNTIME_REQUIREMENTS", DEFAULT_RUNTIME_REQUIREMENTS))


def install_error_excerpt(lines: Sequence[str], limit: int = 8) -> str:
    """The meaningful end of installer output: from the first error line on (uv ``error:``,
    pip ``ERROR:``), else the last non-empty lines."""
    clean = [ln.rstrip() for ln in lines if ln.strip()]
    for i, line in enumerate(clean):
        if line.lstrip().lower().startswith("error"):
            return "\n".join(clean[i:i + limit])
    return "\n".join(clean[-limit:])


# -- interpreter ---------------------------------------------------------------------------


def resolve_python(python: str | None) -> Path:
    """Absolute path of the bundle interpreter: ``python`` (path or command) or this one."""
    if python is None:
        return Path(sys.executable)
    found = shutil.which(python)
    if found is None:
        raise BuildError(f"python interpreter {python!r} not found; set the `python` setting to an "
                         "existing interpreter", field="python")
    return Path(found).absolute()


def python_identity(interpreter: Path) -> str:
    """Implementation, full version and machine of ``interpreter`` (part of the env key)."""
    if interpreter == Path(sys.executable):
        return f"{sys.implementation.name} {platform.python_version()} {platform.machine()}"
    code = ("import platform, sys; print(sys.implementation.name, platform.python_version(), "
            "platform.machine())")
    try:
        out = subprocess.run([str(interpreter), "-c", code], capture_output=True, text=True,
                             timeout=30, check=True)
    except (OSError, subprocess.SubprocessError) as e:
        raise BuildError(f"python interpreter {interpreter} does not run: {e}", field="python") from e
    return out.stdout.strip()


# -- environments --------------------------------------------------------------------------


def ensure_env(home: Path, key: str, requirements: Sequence[str], interpreter: Path, log: Log,
               cancel: threading.Event, probe: Sequence[str] = ()) -> tuple[Path, bool]:
    """Return (python of env ``key``, reused?) building the env first if it is not complete.

    Two builders of one key serialise on an fcntl lock; the loser finds the env complete.
    A new env must import the modules ``probe`` names before it counts as complete. The
    requirements are installed from uv's cache alone when it holds a solution (``--offline``:
    an unpinned requirement gets the newest version the cache knows), else against the index,
    as links and not byte-compiled: what serving imports (``probe``, the scoring server and
    the heavy modules of the requirements) is imported once, which compiles it, and the rest
    of the env is compiled afterwards by a background process on idle CPU, off the critical path.
    """
    final = home / "envs" / key
    if _env_complete(final):
        log(f"reusing environment {key[:12]}")
        return final / "bin" / "python", True
    with exclusive_lock(home, key, log, cancel):
        if _env_complete(final):
            log(f"reusing environment {key[:12]} (built meanwhile)")
            return final / "bin" / "python", True
        if final.exists():  # incomplete: never reused
            shutil.rmtree(final, ignore_errors=True)
        remove_abandoned(final.parent)  # e.g. an earlier build of this env that was killed
        started = time.monotonic()
        with atomic_dir(final) as tmp:
            compile_all = _create_env(tmp, requirements, interpreter, log, cancel)
            _probe_imports(tmp, probe, log, cancel)
            if not compile_all:
                _warm_imports(tmp, [m for m in (*SERVING_MODULES, *heavy_modules(requirements)) if m not in probe],
                              log, cancel)
            _retarget_scripts(tmp, final)
            marker = {"env_key": key, "python": str(interpreter), "requirements": list(requirements),
                      "created_at": now_iso()}
            (tmp / ENV_MARKER).write_text(json.dumps(marker, indent=2) + "\n")
            check_cancel(cancel)
        log(f"environment {key[:12]} ready in {time.monotonic() - started:.1f}s")
        if not compile_all:
            compile_in_background(final, log)
        return final / "bin" / "python", False


def _env_complete(env: Path) -> bool:
    return (env / ENV_MARKER).is_file() and (env / "bin" / "python").exists()


@contextlib.contextmanager
def exclusive_lock(home: Path, key: str, log: Log, cancel: threading.Event) -> Iterator[None]:
    """Hold an exclusive fcntl lock for env ``key``; waiting stays cancellable."""
    locks = home / "locks"
    locks.mkdir(parents=True, exist_ok=True)
    (home / "envs").mkdir(parents=True, exist_ok=True)
    with open(locks / f"env-{key}.lock", "a+") as fh:
        waited = False
        while True:
            try:
                fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if not waited:
                    log(f"waiting for another build of environment {key[:12]}")
                    waited = True
                check_cancel(cancel)
                time.sleep(_POLL_S)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _create_env(tmp: Path, requirements: Sequence[str], interpreter: Path, log: Log,
                cancel: threading.Event) -> bool:
    """Create a virtualenv at ``tmp`` (an empty folder) and install ``requirements`` into it;
    return whether the installer byte-compiled it whole (pip does; uv links files from its
    cache and compiles nothing, unless UV_COMPILE_BYTECODE asks it to)."""
    with temp_file(tmp.parent, "requirements.txt") as reqs_file:
        reqs_file.write_text("".join(f"{r}\n" for r in requirements))
        uv = find_uv()
        if uv:
            log(f"creating environment with uv ({interpreter})")
            _run_step([uv, "venv", "--relocatable", "--python", str(interpreter), str(tmp)],
                      "create the virtualenv", log, cancel)
            install = [uv, "pip", "install", "--python", str(tmp / "bin" / "python"), "-r", str(reqs_file)]
            # from uv's cache alone first (no index round trips: 0.1 s instead of 1.4 s here)
            if run_streaming([*install, "--offline"], lambda _line: None, cancel)[0] == 0:
                log(f"installed {len(requirements)} requirements from uv's cache")
            else:
                log(f"installing {len(requirements)} requirements")
                _run_step(install, "install the requirements", log, cancel, requirements)
            return os.environ.get("UV_COMPILE_BYTECODE", "").lower() in ("1", "true", "yes", "on")
        log(f"uv not found; creating environment with {interpreter} -m venv")
        _run_step([str(interpreter), "-m", "venv", str(tmp)], "create the virtualenv", log, cancel)
        log(f"installing {len(requirements)} requirements with pip")
        _run_step([str(tmp / "bin" / "python"), "-m", "pip", "install", "--disable-pip-version-check",
                   "-r", str(reqs_file)], "install the requirements", log, cancel, requirements)
        return True


def _warm_imports(env: Path, modules: Sequence[str], log: Log, cancel: threading.Event) -> None:
    """Import ``modules`` once with the env's interpreter so that their bytecode is written (a
    module that does not import is only reported: the model's own load says whether it matters)."""
    if not modules:
        return
    log(f"compiling what serving imports ({len(modules)} modules)")
    code = ("import importlib, sys, warnings\nwarnings.simplefilter('ignore')\nfor name in sys.argv[1:]:\n"
            "    try:\n        importlib.import_module(name)\n    except Exception as e:\n"
            "        print(f'not imported: {name} ({type(e).__name__})')\n")
    rc, tail = _run_in_env(env, [code, *modules], log, cancel)
    if rc != 0:
        log(f"compiling what serving imports stopped (exit code {rc}): {install_error_excerpt(tail, 3)}")


def compile_in_background(env: Path, log: Log) -> None:
    """Byte-compile the whole env in a detached process that runs only on idle CPU
    (``SCHED_IDLE``, else nice 19) and idle disk time (``ionice -c 3`` where it exists), one
    module at a time; a scoring process that imports a module first compiles it itself, as
    Python always does."""
    site = sorted(env.glob("lib/python*/site-packages"))
    if not site:
        return
    ionice = shutil.which("ionice")
    argv = [*([ionice, "-c", "3"] if ionice else []), str(env / "bin" / "python"), "-c", _COMPILE_IDLE,
            *map(str, site)]
    with contextlib.suppress(OSError):
        subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                         start_new_session=True, close_fds=True, env=_compile_env(None))
        log("compiling the rest of the environment in the background")


_COMPILE_IDLE = """import compileall, os, sys
try:
    os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))
except (AttributeError, OSError):
    os.nice(19)
for folder in sys.argv[1:]:
    compileall.compile_dir(folder, quiet=1)
"""


def _run_in_env(env: Path, args: Sequence[str], log: Log, cancel: threading.Event) -> tuple[int, list[str]]:
    """``python -c ARGS`` with the env's interpreter, the scoring runtime (a copy as bundles hold
    it, never modelcd's own site) on its path and bytecode writing on."""
    with tempfile.TemporaryDirectory(prefix="modelcd-probe-") as runtime:
        _copy_runtime(Path(runtime) / "rt")
        return run_streaming([str(env / "bin" / "python"), "-c", *args], log, cancel,
                             env=_compile_env(Path(runtime) / "rt"))


def _compile_env(runtime: Path | None) -> dict[str, str]:
    """The environment of the env's interpreter at build: what a scoring process inherits (the
    packages' code runs there, never with the service's secrets), writing bytecode whatever
    modelcd's own setting says."""
    env = inherited_env(os.environ)
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    if runtime is not None:
        env["PYTHONPATH"] = str(runtime)
    return env


def _probe_imports(env: Path, modules: Sequence[str], log: Log, cancel: threading.Event) -> None:
    """Import ``modules`` with the env's interpreter, writing the bytecode of every module that
    imports (so scoring starts find it compiled, even under PYTHONDONTWRITEBYTECODE); BuildError
    with the error when one fails (the requirements installed, but do not work together here).
    Compiling only these, not the whole env (mlflow-skinny, pandas, numpy: about 20 s here), is
    most of what makes a pyfunc env quick to build."""
    if not modules:
        return
    log(f"checking the environment: import {', '.join(modules)}")
    code = "import warnings; warnings.simplefilter('ignore'); " + "; ".join(f"import {m}" for m in modules)
    rc, tail = _run_in_env(env, [code], log, cancel)
    if rc != 0:
        raise BuildError(f"the requirements installed, but `import {', '.join(modules)}` fails in the environment "
                         f"(exit code {rc}):\n{install_error_excerpt(tail)}\nfix the model's requirements "
                         "(its requirements.txt / python_env.yaml)", field="requirements")


def pyfunc_interpreter(files_dir: Path, version: ModelVersion, default: Path, log: Log) -> Path:
    """The interpreter for an MLflow model's environment: ``default`` when it has the Python
    version (major.minor) the model was saved with, else one of that version found on this
    host (``uv python find``, never downloaded). BuildError naming both versions when none is."""
    wanted = model_python(files_dir, version)
    want = python_minor(wanted) if wanted else None
    if want is None:
        return default
    have = python_identity(default)
    if python_minor(have.split()[1] if len(have.split()) > 1 else "") == want:
        log(f"the model was saved with Python {wanted}; building with {default} ({have})")
        return default
    found = find_python(f"{want[0]}.{want[1]}")
    if found is not None:
        log(f"the model was saved with Python {wanted}; building with {found}")
        return found
    raise BuildError(f"{version.model} v{version.version} was saved with Python {wanted}, and this build host has "
                     f"no Python {want[0]}.{want[1]} (modelcd builds with {default}: {have}; `uv python find "
                     f"{want[0]}.{want[1]}` found none and nothing is downloaded): install Python {want[0]}.{want[1]} "
                     "on the build host, or log the model again with the Python modelcd uses", field="python")


def check_model_python(files_dir: Path, version: ModelVersion, have: str, where: str) -> None:
    """BuildError when an MLflow model was saved with another Python (major.minor) than the
    ``have`` version of ``where`` (e.g. a base image's interpreter)."""
    wanted = model_python(files_dir, version)
    want = python_minor(wanted) if wanted else None
    if want is not None and python_minor(have) != want:
        raise BuildError(f"{version.model} v{version.version} was saved with Python {wanted}, but {where} has "
                         f"Python {have}: use a base image with Python {want[0]}.{want[1]}, or log the model "
                         f"again with Python {have}", field="python")


def loader_module(files_dir: Path, version: ModelVersion) -> tuple[str, ...]:
    """The ``loader_module`` of an MLflow model's ``python_function`` flavor (e.g.
    ``mlflow.lightgbm``), when it is a dotted module name; () otherwise."""
    from modelcd.errors import InvalidInput
    from modelcd.registry.flavors import pyfunc_conf, read_mlmodel

    rel = version.model_file or "MLmodel"
    try:
        conf = pyfunc_conf(read_mlmodel(files_dir / rel, rel)) or {}
    except (InvalidInput, OSError):
        return ()
    name = conf.get("loader_module")
    return (name,) if isinstance(name, str) and re.fullmatch(r"[A-Za-z_][\w]*(\.[A-Za-z_][\w]*)*", name) else ()


def model_python(files_dir: Path, version: ModelVersion) -> str | None:
    """The Python version an MLflow model says it was saved with (python_env.yaml, MLmodel)."""
    from modelcd.errors import InvalidInput
    from modelcd.registry.flavors import read_mlmodel
    from modelcd.registry.requirements import load_pyfunc_environment

    rel = version.model_file or "MLmodel"
    try:
        return load_pyfunc_environment(files_dir, rel, read_mlmodel(files_dir / rel, rel)).python
    except (InvalidInput, OSError) as e:
        raise BuildError(f"cannot read the environment of {rel}: {getattr(e, 'message', e)}",
                         field="requirements") from e


def find_python(version: str) -> Path | None:
    """An installed interpreter of ``version`` (e.g. ``3.12``) as uv finds it, never downloading
    one; without uv, ``python3.12`` on PATH."""
    uv = find_uv()
    if uv:
        try:
            out = subprocess.run([uv, "python", "find", "--no-python-downloads", version], capture_output=True,
                                 text=True, timeout=60, stdin=subprocess.DEVNULL)
        except (OSError, subprocess.SubprocessError):
            return None
        path = out.stdout.strip().splitlines()[-1] if out.returncode == 0 and out.stdout.strip() else ""
        return Path(path) if path else None
    found = shutil.which(f"python{version}")
    return Path(found) if found else None


def find_uv() -> str | None:
    """The uv binary of the ``uv`` package, else one on PATH, else None."""
    try:
        import uv

        return str(uv.find_uv_bin())
    except (ImportError, FileNotFoundError):
        return shutil.which("uv")


def _retarget_scripts(tmp: Path, final: Path) -> None:
    """Point scripts written with the temp path (pip's shebangs, activate) at the final path."""
    old, new = str(tmp).encode(), str(final).encode()
    for script in (tmp / "bin").iterdir():
        if script.is_symlink() or not script.is_file() or script.stat().st_size > 1_000_000:
            continue
        data = script.read_bytes()
        if old in data and b"\x00" not in data[:1024]:
            script.write_bytes(data.replace(old, new))


def _run_step(argv: list[str], what: str, log: Log, cancel: threading.Event,
              requirements: Sequence[str] = ()) -> None:
    """Run one installer step, raising BuildError with the meaningful end of its output."""
    rc, tail = run_streaming(argv, log, cancel)
    if rc == 0:
        return
    excerpt = install_error_excerpt(tail)
    named = [r for r in requirements if _req_name(r) in excerpt.lower()]
    blame = f" (requirement {', '.join(repr(r) for r in named)})" if named else ""
    raise BuildError(f"cannot {what}{blame}: exit code {rc}\n{excerpt}", field="requirements" if blame else None)


def _req_name(requirement: str) -> str:
    match = _REQ_NAME.match(requirement)
    return match.group(1).lower() if match else requirement.lower()


def run_streaming(argv: list[str], log: Log, cancel: threading.Event, *,
                  env: dict[str, str] | None = None, cwd: Path | None = None,
                  keep: int = 200) -> tuple[int, list[str]]:
    """Run ``argv`` (never through a shell), passing each output line to ``log``.

    Returns (exit code, last ``keep`` lines). If ``cancel`` is set the whole process group
    is killed and Cancelled raised.
    """
    env = dict(os.environ if env is None else env)
    env.setdefault("NO_COLOR", "1")
    try:
        proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                env=env, cwd=cwd, start_new_session=True, text=True, errors="replace")
    except OSError as e:
        raise BuildError(f"cannot run {Path(argv[0]).name}: {e.strerror}") from e
    lines: Queue[str | None] = Queue()
    tail: deque[str] = deque(maxlen=keep)
    reader = threading.Thread(target=_pump, args=(proc, lines), daemon=True)
    reader.start()
    try:
        done = False
        while not done:
            if cancel.is_set():
                raise Cancelled(f"stopped while running {Path(argv[0]).name}")
            try:
                line = lines.get(timeout=_POLL_S)
            except Empty:
                continue
            if line is None:
                done = True
            else:
                tail.append(line)
                log(line)
        return proc.wait(), list(tail)
    finally:
        if proc.poll() is None:
            _kill_group(proc)
        reader.join(timeout=5)
        if proc.stdout:
            proc.stdout.close()


def _pump(proc: subprocess.Popen[str], lines: Queue[str | None]) -> None:
    assert proc.stdout is not None
    for line in proc.stdout:
        lines.put(line.rstrip("\n"))
    lines.put(None)


def _kill_group(proc: subprocess.Popen[str]) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


# -- bundle folder -------------------------------------------------------------------------


def _ensure_bundle_dir(home: Path, version: ModelVersion, files_dir: Path, env_python: Path, key: str,
                       log: Log, cancel: threading.Event) -> Path:
    """Return the complete bundle folder, writing it (temp + rename) when missing."""
    parent = home / "bundles" / version.model
    final = parent / f"{version.version}-{version.digest12}"
    meta = {"model": version.model, "version": version.version, "digest": version.digest,
            "python": str(env_python), "env_key": key, "created_at": now_iso()}
    if (final / BUNDLE_MARKER).is_file():
        old = json.loads((final / BUNDLE_MARKER).read_text())
        if old.get("env_key") != key:  # same files, other interpreter/runtime: repoint in place
            write_atomic(final / BUNDLE_MARKER, json.dumps(meta, indent=2) + "\n")
            log(f"bundle {final.name} repointed to environment {key[:12]}")
        else:
            log(f"reusing bundle {final.name}")
        return final
    try:
        with atomic_dir(final) as tmp:
            write_scoring_files(tmp, version, files_dir, cancel)
            (tmp / BUNDLE_MARKER).write_text(json.dumps(meta, indent=2) + "\n")
            check_cancel(cancel)
    except FileExistsError as e:
        if not (final / BUNDLE_MARKER).is_file():  # not a concurrent twin: a real failure
            raise BuildError(f"cannot write bundle {final}: {e}") from e
        log(f"bundle {final.name} was built concurrently; using it")
    except OSError as e:
        raise BuildError(f"cannot write bundle {final}: {e}") from e
    else:
        log(f"bundle ready: {final}")
    return final


def write_scoring_files(dest: Path, version: ModelVersion, files_dir: Path, cancel: threading.Event) -> None:
    """What every target serves from, in ``dest`` (created): ``model/`` (the version's files),
    ``runtime/`` (the scoring runtime) and ``scoring.json`` (what the runtime needs to know)."""
    shutil.copytree(files_dir, dest / "model")
    check_cancel(cancel)
    _copy_runtime(dest / "runtime")
    scoring = {"model": version.model, "version": version.version, "flavor": str(version.flavor),
               "model_file": version.model_file, "entry_script": version.entry_script,
               "sample": version.sample, "expected": version.expected}
    if version.flavor == Flavor.SKLEARN and (version.model_file or "").lower().endswith(".skops"):
        scoring["skops_trusted_types"] = skops_trusted_types(files_dir, str(version.model_file))
    (dest / "scoring.json").write_text(json.dumps(scoring, indent=2) + "\n")


def skops_trusted_types(files_dir: Path, model_file: str) -> list[str]:
    """The types an MLflow ``MLmodel`` beside a ``.skops`` model file says to trust beyond
    skops' defaults (``flavors.sklearn.skops_trusted_types``); none without such a file."""
    mlmodel = files_dir / Path(model_file).parent / "MLmodel"
    try:
        doc = yaml.safe_load(mlmodel.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError):
        return []
    conf = ((doc or {}).get("flavors") or {}).get("sklearn") if isinstance(doc, dict) else None
    trusted = conf.get("skops_trusted_types") if isinstance(conf, dict) else None
    return [t for t in trusted if isinstance(t, str) and t] if isinstance(trusted, list) else []


def _copy_runtime(dest: Path) -> None:
    """Copy ``modelcd/__init__.py`` and the ``modelcd.scoring`` package (no caches)."""
    package = Path(modelcd.__file__).parent
    (dest / "modelcd").mkdir(parents=True)
    shutil.copy2(package / "__init__.py", dest / "modelcd" / "__init__.py")
    if not (package / "scoring").is_dir():
        raise BuildError(f"the scoring runtime is missing from the installed modelcd ({package / 'scoring'})")
    shutil.copytree(package / "scoring", dest / "modelcd" / "scoring",
                    ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))


# -- checks --------------------------------------------------------------------------------


def check_files(version: ModelVersion, files_dir: Path) -> None:
    """The model file / entry script exist inside the files; the entry script compiles."""
    if not files_dir.is_dir():
        raise BuildError(f"model files of {version.model} v{version.version} not found at {files_dir}")
    if version.flavor == Flavor.CUSTOM:
        if not version.entry_script:
            raise BuildError(f"{version.model} v{version.version} has flavor custom but no entry script",
                             field="entry_script")
        script = _inside(files_dir, version.entry_script, "entry_script")
        check_entry_script(script, version.entry_script)
    elif version.model_file:
        _inside(files_dir, version.model_file, "model_file")


def check_entry_script(script: Path, shown_as: str) -> None:
    """Raise BuildError naming ``shown_as:line`` when the script does not compile."""
    try:
        compile(script.read_bytes(), shown_as, "exec", dont_inherit=True)
    except SyntaxError as e:
        raise BuildError(f"entry script {shown_as}:{e.lineno}: {e.msg}", field="entry_script") from e
    except ValueError as e:  # e.g. null bytes
        raise BuildError(f"entry script {shown_as}: {e}", field="entry_script") from e


def _inside(root: Path, relative: str, field: str) -> Path:
    path = (root / relative).resolve()
    if not path.is_relative_to(root.resolve()):
        raise BuildError(f"{field} {relative!r} points outside the model files", field=field)
    if not path.is_file():
        raise BuildError(f"{field} {relative!r} not found in the model files", field=field)
    return path


def check_name(name: str, what: str) -> None:
    if not _SAFE_NAME.match(name) or ".." in name:
        raise BuildError(f"{what} {name!r} is not a safe folder name (letters, digits, '.', '_', '-')",
                         field="model")


def check_cancel(cancel: threading.Event) -> None:
    if cancel.is_set():
        raise Cancelled("build stopped")


def now_iso() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")
