"""Evaluation of a model version on labelled data: the data scored in the version's own
environment by the batch engine (``batch.scoring.scored_chunks``: the label column is carried
beside the predictions, never given to the model), the metrics folded chunk by chunk
(``batch.metrics``), so memory stays flat whatever the data's size.

The data's identity (``data_identity``) is what makes a stored evaluation reusable: a sha256
over a local file's (or folder's files') names and bytes, or an S3 prefix's keys, sizes and
ETags; a SQL source has none (its URI is all there is to compare).
"""

from __future__ import annotations

import hashlib
import re
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import pandas as pd

from modelcd.batch.datasets import CHUNK_ROWS, Connections, Source, parse_uri, s3_client
from modelcd.batch.metrics import Classification, accumulator, guess_task, parse_metrics, task_of
from modelcd.batch.scoring import scored_chunks
from modelcd.errors import BatchFailed, Cancelled, InvalidInput

Log = Callable[[str], None]
_VECTOR = re.compile(r"^prediction_\d+$")
_RESERVED = ("prediction", "model_version")
_LABEL_MAX = 256


def check_label(label: Any) -> str:
    """The label column's name; InvalidInput naming ``label`` when it cannot be one."""
    if not isinstance(label, str) or not label.strip():
        raise InvalidInput("label is missing: give the column holding the true values (--label COLUMN)",
                           field="label")
    label = label.strip()
    if len(label) > _LABEL_MAX or any(ord(c) < 32 for c in label):
        raise InvalidInput(f"label must be a column name of at most {_LABEL_MAX} printable characters",
                           field="label")
    if label in _RESERVED or _VECTOR.match(label):
        raise InvalidInput(f"label: {label!r} is the name the predictions take; rename the data's column",
                           field="label")
    return label


def _source_identity(source: Source, settings: Any) -> str | None:
    """sha256 of what the source reads (see the module docstring); None for SQL."""
    digest = hashlib.sha256()
    if source.loc.kind == "file":
        root = source.loc.path
        assert root is not None
        for path in source.files:
            name = path.name if path == root else str(path.relative_to(root))
            digest.update(f"{name}\0{path.stat().st_size}\0".encode())
            with path.open("rb") as f:
                while block := f.read(1 << 20):
                    digest.update(block)
        return "sha256:" + digest.hexdigest()
    if source.loc.kind == "s3":
        client = s3_client(settings)
        try:
            for key in source.keys:
                head = client.head_object(Bucket=source.loc.bucket, Key=key)
                digest.update(f"{key}\0{head['ContentLength']}\0{head.get('ETag', '')}\0".encode())
        except Exception as e:
            raise BatchFailed(f"data: cannot read {source.loc.uri}: {type(e).__name__}: {e}", field="data") from e
        return "sha256:" + digest.hexdigest()
    return None


def data_identity(ctx: Any, data_uri: str, fmt: str | None = None) -> str | None:
    """The identity of the data at ``data_uri`` now (InvalidInput naming ``data`` when there is
    nothing there)."""
    from modelcd.fsutil import scratch_dir

    loc = parse_uri(data_uri, "data")
    (ctx.home / "tmp").mkdir(parents=True, exist_ok=True)
    with scratch_dir(ctx.home / "tmp", "eval-id") as scratch:
        try:
            source = Source(loc, fmt, scratch=scratch, settings=ctx.settings, connections=Connections(ctx.db))
        except InvalidInput as e:
            raise _as_data(e) from None
        return _source_identity(source, ctx.settings)


def _as_data(e: InvalidInput) -> InvalidInput:
    """An error the dataset code names ``input`` as the ``data`` of an evaluation."""
    if e.field != "input":
        return e
    message = e.message[len("input: "):] if e.message.startswith("input: ") else e.message
    return InvalidInput(f"data: {message}", field="data")


def _predictions(frame: pd.DataFrame, label: str) -> tuple[pd.Series, pd.Series | None]:
    """(the predicted class or value, the score for roc_auc) of the scored rows: ``prediction``;
    for a vector per row (class scores), the index of the largest and the last column's score;
    for a mapping per row, its only key, or ``label`` / ``class`` and ``score`` / ``probability``."""
    columns = [c for c in frame.columns if c not in (label, "model_version")]
    if "prediction" in columns:
        return frame["prediction"], frame["prediction"]
    if columns and all(_VECTOR.match(c) for c in columns):
        matrix = frame[columns].to_numpy(dtype="float64")
        return pd.Series(np.argmax(matrix, axis=1)), pd.Series(matrix[:, -1])
    if len(columns) == 1:
        return frame[columns[0]], frame[columns[0]]
    named = next((c for c in ("label", "class", "predicted_label") if c in columns), None)
    score = next((c for c in ("score", "probability") if c in columns), None)
    if named is None:
        raise InvalidInput(f"the model answers several values per row ({', '.join(columns[:10])}); an evaluation "
                           "needs one prediction per row (or a mapping with 'label')", field="model")
    return frame[named], frame[score] if score else None


def evaluate_dataset(ctx: Any, *, model: str, version: int, data_uri: str, label: str,
                     metrics: str | Sequence[str] | None, fmt: str | None, log: Log, cancel: threading.Event,
                     max_errors: int | None = 0, chunk_rows: int = CHUNK_ROWS) -> dict[str, Any]:
    """Score ``data_uri`` with ``model`` v``version`` and compare with its ``label`` column.

    Returns ``batch.metrics``' result (task, rows, metrics, confusion matrix or residuals) with
    ``data_digest``, ``rows_read``, ``rows_scored``, ``unlabelled`` (rows without a true value,
    left out), ``errors`` and ``first_errors`` (rows the model could not score, left out: at
    most ``max_errors``, None for any number) and ``seconds``. InvalidInput naming the field
    (``metrics``, ``label``, ``data``, ``format``); BatchFailed; Cancelled."""
    started = time.monotonic()
    wanted = parse_metrics(metrics)
    label = check_label(label)
    identity: list[str | None] = [None]

    def on_source(source: Source) -> None:
        identity[0] = _source_identity(source, ctx.settings)

    acc: Any = None
    unlabelled = 0
    try:
        with scored_chunks(ctx, model=model, version=version, input_uri=data_uri, fmt=fmt, keys=[label],
                           max_errors=max_errors, log=log, cancel=cancel, chunk_rows=chunk_rows,
                           on_source=on_source) as (run, frames):
            for frame in frames:
                predicted, scores = _predictions(frame, label)
                truth = frame[label]
                known = truth.notna().to_numpy()
                unlabelled += int((~known).sum())
                if not known.all():
                    truth, predicted = truth[known], predicted[known]
                    scores = scores[known] if scores is not None else None
                if not len(truth):
                    continue
                if acc is None:
                    task = task_of(wanted) if wanted else guess_task(truth, predicted)
                    acc = accumulator(wanted, task)
                    log(f"{task}: {', '.join(acc.metrics)} of label {label!r}")
                if isinstance(acc, Classification):
                    acc.update(truth, predicted, scores)
                else:
                    acc.update(truth, predicted)
    except InvalidInput as e:
        if e.field == "keys":
            _, _, columns = e.message.partition("(its columns: ")
            raise InvalidInput(f"label: the data has no column {label!r}" + (f" (its columns: {columns}" if columns
                               else "") + "; pass --label with the column holding the true values",
                               field="label") from None
        raise _as_data(e) from None
    except Cancelled:
        raise Cancelled("evaluation stopped; nothing was stored") from None
    except BatchFailed as e:
        message = e.message.replace("; no output was written", "")
        raise BatchFailed(message.replace("input: ", "data: ", 1), field="data" if e.field == "input"
                          else e.field) from None
    if acc is None or not acc.rows:
        why = f"all {unlabelled} scored rows have no {label!r} value" if unlabelled else "it holds no rows"
        if run.errors:
            why = f"the model could not score its rows ({run.errors} errors: {'; '.join(run.first_errors[:3])})"
        raise InvalidInput(f"data: nothing to evaluate in {data_uri}: {why}; give labelled rows", field="data")
    result = acc.result()
    seconds = time.monotonic() - started
    result.update(data_digest=identity[0], rows_read=run.rows_read, rows_scored=run.rows_scored,
                  unlabelled=unlabelled, errors=run.errors, first_errors=list(run.first_errors),
                  seconds=round(seconds, 3))
    figures = ", ".join(f"{k} {v:.4g}" for k, v in result["metrics"].items())
    log(f"evaluated {result['rows']} rows of {data_uri} in {seconds:.1f}s: {figures}"
        + (f" ({unlabelled} rows without a label left out)" if unlabelled else "")
        + (f" ({run.errors} rows the model could not score left out)" if run.errors else ""))
    return result


__all__ = ["check_label", "data_identity", "evaluate_dataset"]
