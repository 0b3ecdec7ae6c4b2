"""The batch scoring engine: a dataset scored by one model version in its own environment.

``score_dataset`` builds (or reuses) the version's bundle — the one its process-target
endpoint serves from — and starts ``python -m modelcd.scoring.batch`` with the bundle's
interpreter: the model is loaded once by the runtime's own flavor code and scores chunks sent
over a pipe (``scoring/batch.py``: a float matrix for sklearn models that take one, else the
JSON body ``POST /score`` takes). The input is read in chunks (``batch/datasets.py``), the
predictions go to a spool committed at the end, so memory stays flat whatever the input's
size, and a failed or stopped run leaves nothing where readers look.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import subprocess
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import pandas as pd

from modelcd.batch.datasets import CHUNK_ROWS, Connections, Sink, Source, parse_uri
from modelcd.builders.bundle import build_bundle
from modelcd.errors import BatchFailed, BuildError, Cancelled, InvalidInput
from modelcd.inherited import inherited_env
from modelcd.scoring.batch import read_frame, write_frame
from modelcd.targets.process import Started
from modelcd.targets.warm import WarmStarts, WarmUnavailable

Log = Callable[[str], None]
FIRST_ERRORS = 20
PROGRESS_EVERY_S = 2.0
_STDERR_LINES = 40


@dataclass(frozen=True)
class BatchResult:
    """What a run did: rows read, scored and failed, the first failures with their reason,
    its duration, and where its output was committed."""

    rows_read: int
    rows_scored: int
    errors: int
    first_errors: list[str]
    seconds: float
    output: str


def score_dataset(ctx: Any, *, model: str, version: int, input_uri: str, output_uri: str, fmt: str | None,
                  keys: Sequence[str], max_errors: int | None, log: Log, cancel: threading.Event,
                  chunk_rows: int = CHUNK_ROWS) -> BatchResult:
    """Score every row of ``input_uri`` with ``model`` v``version`` into ``output_uri``.

    InvalidInput naming the field (bad URI, unknown connection, missing key column, unknown
    format); BatchFailed when more than ``max_errors`` rows cannot be scored (None: any number
    may fail), the environment cannot be built or the input cannot be read; Cancelled when
    ``cancel`` is set. In each of those cases no output of the run is visible.
    """
    started = time.monotonic()
    src = parse_uri(input_uri, "input")
    dst = parse_uri(output_uri, "output")
    if src.kind == "file" and dst.kind == "file" and src.path == dst.path:
        raise InvalidInput("output: the output would replace the input", field="output")
    sink = Sink(dst, fmt, settings=ctx.settings, connections=Connections(ctx.db), home=ctx.home)
    with scored_chunks(ctx, model=model, version=version, input_uri=input_uri, fmt=fmt, keys=keys,
                       max_errors=max_errors, log=log, cancel=cancel, chunk_rows=chunk_rows,
                       on_source=lambda source: sink.default_format(source.format)) as (run, frames), \
            sink.spool() as spool, ThreadPoolExecutor(1, thread_name_prefix="batch-write") as writer:
        writes: deque[Future[None]] = deque()  # the spool is written while the next chunk is scored
        try:
            for frame in frames:
                writes.append(writer.submit(spool.write, frame))
                while writes and (len(writes) > 1 or writes[0].done()):
                    writes.popleft().result()
            while writes:
                writes.popleft().result()
        finally:
            for pending in writes:
                pending.cancel()
            if writes:
                wait(list(writes))
        output = sink.commit(spool, log)
    seconds = time.monotonic() - started
    log(f"done: {run.rows_read} rows read, {run.rows_scored} scored, {run.errors} errors in {seconds:.1f}s; "
        f"output {output}")
    return BatchResult(rows_read=run.rows_read, rows_scored=run.rows_scored, errors=run.errors,
                       first_errors=list(run.first_errors), seconds=seconds, output=output)


@contextlib.contextmanager
def scored_chunks(ctx: Any, *, model: str, version: int, input_uri: str, fmt: str | None, keys: Sequence[str],
                  max_errors: int | None, log: Log, cancel: threading.Event, chunk_rows: int = CHUNK_ROWS,
                  on_source: Callable[[Source], None] | None = None) -> Iterator[tuple[_Run, Iterator[pd.DataFrame]]]:
    """The scoring of ``input_uri`` by ``model`` v``version`` in its own environment, for a
    consumer: ``(run, frames)`` where ``frames`` yields, per input chunk, the key columns (or
    ``row``) of the rows scored, their prediction column(s) and ``model_version``; ``run``
    counts rows read, scored and failed. The key columns are not part of the model's input.
    Errors as ``score_dataset``'s; the worker stops on leaving."""
    keys = list(keys)
    if max_errors is not None and max_errors < 0:
        raise InvalidInput("max_errors must be 0 or more", field="max_errors")
    connections = Connections(ctx.db)
    src = parse_uri(input_uri, "input")
    v = ctx.registry.get_version(model, version)
    _check_cancel(cancel)
    (ctx.home / "tmp").mkdir(parents=True, exist_ok=True)
    from modelcd.fsutil import scratch_dir

    with scratch_dir(ctx.home / "tmp", "batch-in") as scratch:
        source = Source(src, fmt, scratch=scratch, settings=ctx.settings, connections=connections,
                        chunk_rows=chunk_rows)
        if on_source is not None:
            on_source(source)
        try:
            files = ctx.registry.materialize(v)
            bundle = build_bundle(ctx.home, v, files, log, cancel, python=ctx.settings.python)
        except BuildError as e:
            raise BatchFailed(f"cannot build the environment of {model} v{version}: {e.message}",
                              field=e.field) from e
        _check_cancel(cancel)
        with Worker(Path(bundle.path), Path(bundle.python), log, warm=_warm_starts(ctx)) as worker:
            chunks = source.chunks()
            first = next(chunks, None)  # read while the worker loads the model
            worker.ready()
            run = _Run(worker, keys, max_errors, str(version), log, cancel)

            def frames() -> Iterator[pd.DataFrame]:
                scoring = time.monotonic()
                for chunk in itertools.chain([first] if first is not None else [], chunks):
                    _check_cancel(cancel)
                    yield run.score(chunk)
                    run.progress(scoring)
                _check_cancel(cancel)
                run.progress(scoring, final=True)

            yield run, frames()


def _warm_starts(ctx: Any) -> WarmStarts | None:
    """The process target's warm parents (None when warm starts are off): a batch worker is
    forked from the same parent as its version's deployments."""
    return getattr(ctx.target("process"), "warm", None)


def _check_cancel(cancel: threading.Event) -> None:
    if cancel.is_set():
        raise Cancelled("batch run stopped; no output was written")


class Worker:
    """``python -m modelcd.scoring.batch`` with a bundle's interpreter, in its own session: forked
    from the environment's warm parent when ``warm`` is given and one can fork it (the model's
    libraries are imported already), else a fresh interpreter."""

    def __init__(self, bundle: Path, python: Path, log: Log, warm: WarmStarts | None = None) -> None:
        self.bundle = bundle
        self.python = python
        self.log = log
        self.warm = warm
        self.proc: Started | None = None
        self.stdin: BinaryIO | None = None
        self.stdout: BinaryIO | None = None
        self.how = "cold"
        self.hello: dict[str, Any] = {}
        self.stderr: deque[str] = deque(maxlen=_STDERR_LINES)
        self._stderr_stream: BinaryIO | None = None
        self._pump: threading.Thread | None = None

    def __enter__(self) -> Worker:
        env = inherited_env(os.environ)
        env.update(PYTHONPATH=str(self.bundle / "runtime"), PYTHONUNBUFFERED="1")
        # absolute, not resolved: resolving the venv's python symlink would leave the venv
        argv = [os.path.abspath(self.python), "-m", "modelcd.scoring.batch", "--model-dir",
                str(self.bundle / "model"), "--config", str(self.bundle / "scoring.json")]
        if not self._fork(argv, env):
            self._exec(argv, env)
        self._pump = threading.Thread(target=self._read_stderr, daemon=True)
        self._pump.start()
        return self

    def _fork(self, argv: list[str], env: dict[str, str]) -> bool:
        """Fork the worker from the environment's parent, its stdio on pipes passed to it."""
        if self.warm is None:
            return False
        pipes = [os.pipe() for _ in range(3)]  # (read, write): stdin, stdout, stderr
        theirs = [pipes[0][0], pipes[1][1], pipes[2][1]]
        ours = [pipes[0][1], pipes[1][0], pipes[2][0]]
        request = {"module": "modelcd.scoring.batch", "stdio": True, "argv": argv[3:], "title": argv, "env": env,
                   "cwd": str(self.bundle), "runtime": str(self.bundle / "runtime")}
        try:
            pid, key = self.warm.fork(argv[0], self.bundle, inherited_env(os.environ), request, fds=theirs)
        except WarmUnavailable as e:
            for fd in ours:
                os.close(fd)
            self.log(f"warm start unavailable ({e}); starting a fresh interpreter")
            return False
        finally:
            for fd in theirs:
                os.close(fd)
        self.proc, self.how = Started(pid, warm=(self.warm, key)), "warm"
        self.stdin, self.stdout = os.fdopen(ours[0], "wb"), os.fdopen(ours[1], "rb")
        self._stderr_stream = os.fdopen(ours[2], "rb")
        return True

    def _exec(self, argv: list[str], env: dict[str, str]) -> None:
        try:
            proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                    env=env, cwd=str(self.bundle), start_new_session=True)
        except OSError as e:
            raise BatchFailed(f"cannot start the scoring worker ({self.python}): {e.strerror}") from e
        self.proc = Started(proc.pid, popen=proc)
        self.stdin, self.stdout, self._stderr_stream = proc.stdin, proc.stdout, proc.stderr

    def ready(self) -> None:
        """Wait for the worker's hello: the model loaded, or BatchFailed with the reason."""
        assert self.proc is not None
        hello = self._receive()[0]
        if not hello.get("ok"):
            raise BatchFailed(f"the model does not load in its environment: {hello.get('error')}")
        self.hello = hello
        self.log(f"scoring worker started ({self.how}, pid {self.proc.pid}, flavor {hello['flavor']}"
                 f"{', float arrays' if hello.get('fast') else ''})")

    def __exit__(self, *exc: object) -> None:
        proc = self.proc
        if proc is None:
            return
        with contextlib.suppress(OSError, ValueError):
            assert self.stdin is not None
            self.stdin.write(b"\x00\x00\x00\x00")
            self.stdin.close()
        if proc.wait(5 if exc[0] is None else 0.5) is None:
            proc.kill()
        if self._pump is not None:
            self._pump.join(timeout=2)
        for stream in (self.stdin, self.stdout, self._stderr_stream):
            if stream is not None:
                with contextlib.suppress(OSError, ValueError):
                    stream.close()

    def _read_stderr(self) -> None:
        assert self._stderr_stream is not None
        for raw in self._stderr_stream:
            line = raw.decode(errors="replace").rstrip()
            if line:
                self.stderr.append(line)

    def request(self, header: dict[str, Any], payload: bytes | memoryview) -> tuple[dict[str, Any], bytes]:
        assert self.stdin is not None
        try:
            write_frame(self.stdin, header, payload)
        except (BrokenPipeError, OSError):
            self._died()
        return self._receive()

    def _receive(self) -> tuple[dict[str, Any], bytes]:
        assert self.stdout is not None
        try:
            header, payload = read_frame(self.stdout)
        except (OSError, ValueError):
            header, payload = None, b""
        if header is None:
            self._died()
        return header, payload  # type: ignore[return-value]

    def _died(self) -> None:
        assert self.proc is not None
        code = self.proc.wait(5)
        if self._pump is not None:
            self._pump.join(timeout=2)
        tail = "\n".join(list(self.stderr)[-10:])
        raise BatchFailed(f"the scoring worker exited (code {code}){': ' + tail if tail else ''}")


class _Run:
    """The scoring of one run: chunks in, output frames out, counts and the first errors."""

    def __init__(self, worker: Worker, keys: list[str], max_errors: int | None, version: str, log: Log,
                 cancel: threading.Event) -> None:
        self.worker = worker
        self.keys = keys
        self.max_errors = max_errors
        self.version = version
        self.log = log
        self.cancel = cancel
        self.rows_read = 0
        self.rows_scored = 0
        self.errors = 0
        self.first_errors: list[str] = []
        self.features: list[str] | None = None
        self._last_log = time.monotonic()
        self._logged = -1
        hello = worker.hello
        self.fast = bool(hello.get("fast"))
        self.flavor = hello.get("flavor")
        self.model_features: list[str] | None = hello.get("features")
        self.n_features: int | None = hello.get("n_features")

    def _columns(self, chunk: pd.DataFrame) -> list[str]:
        """The feature columns, fixed by the first chunk."""
        if self.features is not None:
            return self.features
        names = [str(c) for c in chunk.columns]
        missing = [k for k in self.keys if k not in names]
        if missing:
            raise InvalidInput(f"keys: the input has no column {', '.join(map(repr, missing))} (its columns: "
                               f"{', '.join(names[:20])})", field="keys")
        if self.model_features:
            lacking = [f for f in self.model_features if f not in names]
            if lacking:
                raise InvalidInput(f"input: the model needs column(s) {', '.join(map(repr, lacking))}, which the "
                                   "input lacks", field="input")
            self.features = list(self.model_features)
        else:
            self.features = [n for n in names if n not in self.keys]
            if self.n_features is not None and len(self.features) != self.n_features:
                raise InvalidInput(f"input: the model takes {self.n_features} feature(s); the input has "
                                   f"{len(self.features)} column(s) besides the keys ({', '.join(self.features[:20])})",
                                   field="input")
        return self.features

    def score(self, chunk: pd.DataFrame) -> pd.DataFrame:
        """The output rows of one chunk (rows that failed left out, counted)."""
        n = len(chunk)
        first_row = self.rows_read
        self.rows_read += n
        columns = self._columns(chunk)
        chunk = chunk.reset_index(drop=True)
        frame_errors: list[tuple[int, str]] = []
        if self.fast:
            matrix, bad = _float_matrix(chunk, columns)
            good = np.ones(n, dtype=bool)
            for i, reason in bad:
                good[i] = False
                frame_errors.append((i, reason))
            self._check_limit(len(frame_errors))
            index = np.flatnonzero(good)
            if len(index) < n:
                matrix = np.ascontiguousarray(matrix[index])
            limit = None if self.max_errors is None else self.max_errors - self.errors - len(frame_errors)
            answer, payload = self.worker.request({"encoding": "f8", "shape": list(matrix.shape), "limit": limit},
                                                  memoryview(matrix).cast("B"))
        else:
            index = np.arange(n)
            limit = None if self.max_errors is None else self.max_errors - self.errors
            answer, payload = self.worker.request({"encoding": "json", "limit": limit}, _body(chunk, columns,
                                                                                              self.flavor))
        if not answer.get("ok"):
            if answer.get("too_many"):  # the worker stopped looking once past the limit
                found = [(int(index[i]), reason) for i, reason in answer.get("errors") or []]
                self._record(sorted(frame_errors + found), chunk, first_row)
                self._check_limit(1)
            raise BatchFailed(f"scoring failed: {answer.get('error')}")
        for i, reason in answer.get("errors") or []:
            frame_errors.append((int(index[i]), reason))
        predictions = _decode(answer, payload)
        failed = np.zeros(n, dtype=bool)
        for i, _ in frame_errors:
            failed[i] = True
        self._record(sorted(frame_errors), chunk, first_row)
        kept = np.flatnonzero(~failed)
        if len(predictions) != len(kept):
            raise BatchFailed(f"the worker answered {len(predictions)} predictions for {len(kept)} rows")
        out = self._keys_frame(chunk, kept, first_row)
        for name, values in _prediction_columns(predictions).items():
            out[name] = values
        out["model_version"] = self.version
        self.rows_scored += len(kept)
        return out

    def _keys_frame(self, chunk: pd.DataFrame, kept: np.ndarray, first_row: int) -> pd.DataFrame:
        if self.keys:
            return chunk.loc[kept, self.keys].reset_index(drop=True)
        return pd.DataFrame({"row": kept.astype("int64") + first_row})

    def _record(self, errors: list[tuple[int, str]], chunk: pd.DataFrame, first_row: int) -> None:
        for i, reason in errors:
            if len(self.first_errors) < FIRST_ERRORS:
                where = f"row {first_row + i}"
                if self.keys:
                    where += " (" + ", ".join(f"{k}={_plain(chunk.at[i, k])!r}" for k in self.keys) + ")"
                self.first_errors.append(f"{where}: {reason}")
        self.errors += len(errors)
        self._check_limit(0)

    def _check_limit(self, more: int) -> None:
        if self.max_errors is not None and self.errors + more > self.max_errors:
            shown = "; ".join(self.first_errors[:5])
            raise BatchFailed(f"more than {self.max_errors} row(s) could not be scored (max_errors); no output was "
                              f"written{': ' + shown if shown else ''}", field="max_errors")

    def progress(self, started: float, final: bool = False) -> None:
        now = time.monotonic()
        if (not final and now - self._last_log < PROGRESS_EVERY_S) or (final and self._logged == self.rows_read):
            return
        self._last_log, self._logged = now, self.rows_read
        rate = self.rows_read / max(now - started, 1e-9)
        self.log(f"rows read {self.rows_read}, rows scored {self.rows_scored}, {rate:,.0f} rows/s, "
                 f"errors {self.errors}")


def _plain(value: Any) -> Any:
    """A numpy scalar as the Python value it holds (shown in error lines)."""
    item = getattr(value, "item", None)
    return item() if callable(item) else value


def _float_matrix(chunk: pd.DataFrame, columns: list[str]) -> tuple[np.ndarray, list[tuple[int, str]]]:
    """The feature columns as a C-ordered float64 matrix, and the rows whose values are not
    numbers (text that does not parse) with the reason."""
    bad: dict[int, str] = {}
    arrays = []
    for name in columns:
        series = chunk[name]
        if pd.api.types.is_numeric_dtype(series.dtype) or pd.api.types.is_bool_dtype(series.dtype):
            arrays.append(series.to_numpy(dtype="float64", na_value=np.nan))
            continue
        values = pd.to_numeric(series, errors="coerce")
        wrong = values.isna() & series.notna()
        for i in np.flatnonzero(wrong.to_numpy()):
            bad.setdefault(int(i), f"column {name!r}: {series.iat[i]!r} is not a number")
        arrays.append(values.to_numpy(dtype="float64", na_value=np.nan))
    matrix = np.column_stack(arrays) if arrays else np.empty((len(chunk), 0))
    return np.ascontiguousarray(matrix, dtype="float64"), sorted(bad.items())


def _body(chunk: pd.DataFrame, columns: list[str], flavor: Any) -> bytes:
    """The chunk as a scoring request body: ``{"data": rows}`` for an entry script (as Azure ML
    sends it), ``dataframe_split`` with the column names for the other flavors."""
    frame = chunk[columns]
    rows = json.loads(frame.to_json(orient="values", date_format="iso"))
    if flavor == "custom":
        return json.dumps({"data": rows}).encode()
    return json.dumps({"dataframe_split": {"columns": columns, "data": rows}}).encode()


def _decode(answer: dict[str, Any], payload: bytes) -> Any:
    if answer.get("encoding") == "json":
        return json.loads(payload)
    return np.frombuffer(payload, dtype=np.dtype(answer["encoding"])).reshape(answer["shape"])


def _prediction_columns(predictions: Any) -> dict[str, Any]:
    """``prediction``; ``prediction_0..n`` for a vector per row; the keys of a dict per row."""
    if isinstance(predictions, np.ndarray):
        if predictions.ndim <= 1:
            return {"prediction": predictions}
        flat = predictions.reshape(len(predictions), -1)
        return {f"prediction_{j}": flat[:, j] for j in range(flat.shape[1])}
    if not predictions:
        return {"prediction": []}
    first = predictions[0]
    if isinstance(first, dict):
        names = list(dict.fromkeys(k for p in predictions if isinstance(p, dict) for k in p))
        return {str(k): [p.get(k) if isinstance(p, dict) else None for p in predictions] for k in names}
    if isinstance(first, list):
        width = max(len(p) if isinstance(p, list) else 1 for p in predictions)
        return {f"prediction_{j}": [p[j] if isinstance(p, list) and j < len(p) else None for p in predictions]
                for j in range(width)}
    return {"prediction": predictions}


__all__ = ["BatchResult", "score_dataset", "scored_chunks"]
