"""The ``statistics`` job: per-feature statistics of a version's training data
(``analysis.statistics``), computed off the request path and stored with the version
(``Registry.put_statistics``), as ModelOps tools do after an import. The input-drift gate and
the production watch read them.

Two ways in: an upload (``POST /models/<name>/versions/<n>/statistics``, ``modelcd register
--training-data``), kept in a locked temporary under ``home/tmp`` while a worker thread of
this process reads it; and an import (``inbox.importer``) whose files hold
``training_data.csv`` / ``training_data.parquet`` or name a file in the version tag
``modelcd.training_data``, computed in the importing process. A job interrupted by a restart
fails ("upload the training data again"): the upload is not kept."""

from __future__ import annotations

import contextlib
import logging
import re
import shutil
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

from modelcd.domain import JobState, JobType, ModelVersion
from modelcd.errors import Cancelled
from modelcd.fsutil import scratch_dir

if TYPE_CHECKING:  # the CLI imports feature_line: keep the service's wiring out of its start
    from modelcd.context import Context
    from modelcd.jobs.service import Job

log = logging.getLogger(__name__)

TRAINING_DATA_TAG = "modelcd.training_data"  # a version tag naming its training data among its files
TRAINING_DATA_FILES = ("training_data.csv", "training_data.parquet", "training_data.jsonl")
MAX_RUNNING = 2  # statistics computed at once in one process; more wait as scheduled
PROGRESS_EVERY_S = 5.0
_slots = threading.BoundedSemaphore(MAX_RUNNING)
_SUFFIX = re.compile(r"\.[A-Za-z0-9]{1,12}")
_UNSAFE = re.compile(r"[\x00-\x1f\x7f]")


def display_name(filename: str | None) -> str:
    """The uploaded file's name as shown and stored: its last path part, without control
    characters, at most 200 characters; ``training-data`` when none was given."""
    name = _UNSAFE.sub("", Path((filename or "").replace("\\", "/")).name).strip()
    return name[-200:] or "training-data"


def _suffix(name: str) -> str:
    """The name's last one or two suffixes (``.csv``, ``.csv.gz``): what the reader looks at."""
    return "".join(s.lower() for s in Path(name).suffixes[-2:] if _SUFFIX.fullmatch(s))


def start_statistics_job(ctx: Context, model: str, version: int, upload: IO[bytes], filename: str | None,
                         by: str | None = None) -> Job:
    """Save ``upload`` (the training data) in a locked temporary, create the job (``by``: who
    asked), and compute on a worker thread; returns the job, scheduled. NotFound when the
    version does not exist."""
    ctx.registry.get_version(model, version)
    source = display_name(filename)
    stack = contextlib.ExitStack()
    try:
        work = stack.enter_context(scratch_dir(ctx.home / "tmp", "statistics"))
        path = work / f"training-data{_suffix(source)}"
        with path.open("wb") as f:
            shutil.copyfileobj(upload, f, 1024 * 1024)
        job = ctx.jobs.create(JobType.STATISTICS, model=model, version=version, actor=by)
        ctx.jobs.transition(job.id, JobState.SCHEDULED, f"statistics of {source} ({path.stat().st_size} bytes)")
        thread = threading.Thread(target=_in_thread, args=(ctx, job.id, path, source, stack),
                                  name=f"statistics-{job.id}", daemon=True)
        thread.start()
    except BaseException:
        stack.close()
        raise
    return ctx.jobs.get(job.id)


def _in_thread(ctx: Context, job_id: str, path: Path, source: str, stack: contextlib.ExitStack) -> None:
    with stack, _slots:
        try:
            run_statistics_job(ctx, job_id, path, source)
        except Exception:
            log.exception("statistics job %s", job_id)


def run_statistics_job(ctx: Context, job_id: str, path: Path, source: str) -> bool:
    """Compute the statistics of ``path`` for the job's version and store them; the job ends
    succeeded, failed (the cause in its error and log) or cancelled. True when stored."""
    from modelcd.analysis.statistics import CATEGORICAL, statistics_from_file

    def body(job: Job, write: Callable[[str], None], cancel: threading.Event) -> str:
        assert job.model is not None and job.version is not None
        started = time.monotonic()
        write(f"reading {source} ({path.stat().st_size} bytes) for {job.model} v{job.version}")
        stats = statistics_from_file(path, name=source, progress=_progress(cancel, write, started))
        seconds = time.monotonic() - started
        categorical = sum(1 for f in stats.features if f.kind == CATEGORICAL)
        write(f"rows read {stats.rows}, features {len(stats.features)} ({len(stats.features) - categorical} numeric, "
              f"{categorical} categorical), seconds {seconds:.2f}")
        for feature in stats.features[:100]:
            write("  " + feature_line(feature.to_dict()))
        ctx.registry.put_statistics(job.model, job.version, stats.to_dict(), source=source, job_id=job_id)
        return (f"statistics of {stats.rows} rows x {len(stats.features)} features stored with {job.model} "
                f"v{job.version}")

    return ctx.jobs.run_to_end(job_id, f"reading {source}", body, f"statistics of {source}")


def _progress(cancel: threading.Event, write: Callable[[str], None], started: float) -> Callable[[int], None]:
    last = [started]

    def progress(rows: int) -> None:
        if cancel.is_set():
            raise Cancelled("stopped by a person")
        now = time.monotonic()
        if now - last[0] >= PROGRESS_EVERY_S:
            last[0] = now
            write(f"{rows} rows read ({now - started:.1f} s)")

    return progress


def feature_line(feature: dict[str, Any]) -> str:
    """One line of a stored feature (``FeatureStats.to_dict()``) for logs and the CLI."""
    head = f"{feature['name']}: {feature['kind']}, {feature['count']} present, {feature['missing']} missing"
    if feature["kind"] == "numeric":
        def num(key: str) -> str:
            value = feature.get(key)
            return "-" if value is None else f"{value:.6g}"

        edges = feature.get("edges") or []
        return (f"{head}, min {num('min')}, max {num('max')}, mean {num('mean')}, std {num('std')}, "
                f"{len(edges) + 1} bins")
    categories = list(feature.get("categories") or [])
    shown = ", ".join(str(c) for c in categories[:5]) + (", ..." if len(categories) > 5 else "")
    return f"{head}, {feature.get('distinct')} distinct ({shown})"


def statistics_after_import(ctx: Context, version: ModelVersion, files: Path) -> str | None:
    """After an import: when the version's files hold its training data (the file the tag
    ``modelcd.training_data`` names, else ``training_data.csv|.parquet|.jsonl`` at the root),
    compute its statistics here as a job. Returns the job id, None when there is no training
    data. Never raises: the import stands whatever happens (the job records failures)."""
    try:
        named = version.tags.get(TRAINING_DATA_TAG)
        relative = named.strip().lstrip("/") if named else next(
            (n for n in TRAINING_DATA_FILES if (files / n).is_file()), None)
        if not relative:
            return None
        job = ctx.jobs.create(JobType.STATISTICS, model=version.model, version=version.version)
        path = (files / relative).resolve()
        if not path.is_relative_to(files.resolve()) or not path.is_file():
            message = (f"tag {TRAINING_DATA_TAG}={named!r}: no such file among the version's files; name a file "
                       "inside the model's artifact folder, e.g. training_data.csv")
            ctx.jobs.transition(job.id, JobState.RUNNING, f"reading {relative}")
            ctx.jobs.log(job.id, message)
            ctx.jobs.transition(job.id, JobState.FAILED, error=message)
            return job.id
        run_statistics_job(ctx, job.id, path, relative)
        return job.id
    except Exception:
        log.exception("statistics after the import of %s v%s", version.model, version.version)
        return None


def fail_interrupted(ctx: Context, echo: Callable[[str], None] | None = None) -> list[str]:
    """At start: statistics jobs a dead process left open end (failed when running, else
    cancelled); their upload is gone. Returns their ids."""
    return ctx.jobs.end_interrupted(JobType.STATISTICS, "interrupted by a restart of the service; upload the "
                                    "training data again", echo)
