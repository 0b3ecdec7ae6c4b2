"""Batch scoring worker: loads one model once and scores chunks of rows sent over a pipe.

``python -m modelcd.scoring.batch --model-dir DIR --config FILE`` with the bundle's interpreter
(``modelcd.batch.scoring`` starts it). Like the rest of the runtime it imports only the
standard library and what the model's flavor needs (numpy when there is any).

Frames both ways: 4-byte big-endian length of a JSON header, the header, then ``size`` bytes
of payload. The worker first writes a hello (``{"ok": true, "flavor", "fast", "features",
"n_features"}`` or ``{"ok": false, "error"}`` when the model does not load). Then per request:

- ``{"encoding": "f8", "shape": [n, k], "size", "limit"}``: a C-ordered float64 matrix whose
  columns are in the model's order (sklearn models that take a float array: the fast path);
- ``{"encoding": "json", "rows", "size", "limit"}``: a scoring request body (the same bodies
  ``POST /score`` takes).

The answer: ``{"ok": true, "errors": [[row, reason], ...], "encoding": "f8"|"i8"|...|"json",
"shape", "size"}`` and the predictions of the rows without an error, in order (a numeric
numpy array as raw bytes, else a JSON list). A chunk the model refuses is scored again in
halves until the rows it cannot score are found one by one; more than ``limit`` of them ends
the search (``{"ok": false, "too_many": true, "errors": [...]}``). An empty header ends the worker.
"""

from __future__ import annotations

import argparse
import json
import os
import struct
import sys
from typing import Any, BinaryIO

from .config import ConfigError, load_config
from .flavors import LoadError, ModelError, SklearnScorer, load_scorer
from .protocol import BadInput

_HEADER = struct.Struct(">I")
_REASON_LIMIT = 300


def read_frame(stream: BinaryIO) -> tuple[dict[str, Any] | None, bytes]:
    """(header, payload) of the next frame; (None, b"") at the end of the stream."""
    raw = _read_exact(stream, _HEADER.size)
    if raw is None:
        return None, b""
    length = _HEADER.unpack(raw)[0]
    if length == 0:
        return None, b""
    head = _read_exact(stream, length)
    if head is None:
        return None, b""
    header = json.loads(head)
    size = int(header.get("size") or 0)
    payload = _read_exact(stream, size) if size else b""
    return header, payload or b""


def write_frame(stream: BinaryIO, header: dict[str, Any], payload: bytes | memoryview = b"") -> None:
    """Write one frame and flush it."""
    header = {**header, "size": len(payload)}
    head = json.dumps(header, separators=(",", ":")).encode()
    stream.write(_HEADER.pack(len(head)))
    stream.write(head)
    if len(payload):
        stream.write(payload)
    stream.flush()


def _read_exact(stream: BinaryIO, n: int) -> bytes | None:
    chunks = []
    left = n
    while left:
        data = stream.read(left)
        if not data:
            return None
        chunks.append(data)
        left -= len(data)
    return b"".join(chunks)


class TooMany(Exception):
    """More rows failed than the run allows."""


class Batch:
    """A loaded model scoring chunks; rows it cannot score found by halving."""

    def __init__(self, scorer: Any) -> None:
        self.scorer = scorer
        self.fast = isinstance(scorer, SklearnScorer) and scorer.numeric_only and _has_numpy()

    def hello(self) -> dict[str, Any]:
        scorer = self.scorer
        return {"ok": True, "flavor": scorer.flavor, "fast": self.fast,
                "features": getattr(scorer, "feature_names", None), "n_features": getattr(scorer, "n_features", None)}

    def score_matrix(self, matrix: Any, limit: int | None) -> tuple[list[Any], list[tuple[int, str]]]:
        """(predictions of the good rows in order — a list of numpy arrays — , [(row, reason)])."""
        errors: list[tuple[int, str]] = []
        parts: list[Any] = []
        self._halve(lambda lo, hi: self.scorer.predict_array(matrix[lo:hi]), 0, matrix.shape[0], parts, errors,
                    limit)
        return parts, errors

    def score_rows(self, doc: dict[str, Any], limit: int | None) -> tuple[list[Any], list[tuple[int, str]]]:
        """The same for a request body: ``{"dataframe_split": {"columns", "data"}}`` or ``{"data": rows}``."""
        errors: list[tuple[int, str]] = []
        parts: list[Any] = []
        if "dataframe_split" in doc:
            split = doc["dataframe_split"]
            rows = split["data"]

            def body(lo: int, hi: int) -> bytes:
                return json.dumps({"dataframe_split": {"columns": split["columns"], "data": rows[lo:hi]}}).encode()
        else:
            rows = doc["data"]

            def body(lo: int, hi: int) -> bytes:
                return json.dumps({"data": rows[lo:hi]}).encode()

        def run(lo: int, hi: int) -> list[Any]:
            return _predictions(self.scorer.score(body(lo, hi)), hi - lo)

        self._halve(run, 0, len(rows), parts, errors, limit)
        return parts, errors

    def _halve(self, run: Any, lo: int, hi: int, parts: list[Any], errors: list[tuple[int, str]],
               limit: int | None) -> None:
        if lo >= hi:
            return
        try:
            parts.append(run(lo, hi))
            return
        except (BadInput, ModelError, _Shape) as e:
            if hi - lo == 1:
                errors.append((lo, _reason(e)))
                if limit is not None and len(errors) > limit:
                    raise TooMany(errors) from None
                return
        mid = (lo + hi) // 2
        self._halve(run, lo, mid, parts, errors, limit)
        self._halve(run, mid, hi, parts, errors, limit)


class _Shape(Exception):
    """The model answered with other than one prediction per row."""


def _predictions(answer: Any, rows: int) -> list[Any]:
    """One prediction per row from a scorer's JSON answer (``{"predictions": [...]}``, or an entry
    script's list)."""
    if isinstance(answer, dict) and "predictions" in answer:
        answer = answer["predictions"]
    elif isinstance(answer, str):
        try:
            answer = json.loads(answer)
        except ValueError:
            pass
        if isinstance(answer, dict) and "predictions" in answer:
            answer = answer["predictions"]
    if isinstance(answer, dict) and answer and all(isinstance(v, list) and len(v) == rows for v in answer.values()):
        answer = [dict(zip(answer, values, strict=True)) for values in zip(*answer.values(), strict=True)]
    if not isinstance(answer, list) or len(answer) != rows:
        got = f"{len(answer)} values" if isinstance(answer, list) else type(answer).__name__
        raise _Shape(f"the model answered {got} for {rows} row(s); it must give one prediction per row")
    return answer


def _reason(e: BaseException) -> str:
    text = getattr(e, "message", None) or str(e)
    if isinstance(e, ModelError):
        text = f"{e.exception}: {e.message}"
    text = " ".join(str(text).split())
    return text if len(text) <= _REASON_LIMIT else text[: _REASON_LIMIT - 3] + "..."


def _has_numpy() -> bool:
    try:
        import numpy  # noqa: F401
    except ImportError:
        return False
    return True


def _answer(out: BinaryIO, parts: list[Any], errors: list[tuple[int, str]], fast: bool) -> None:
    head: dict[str, Any] = {"ok": True, "errors": errors}
    if fast and parts:
        import numpy as np

        arrays = [np.asarray(p) for p in parts]
        if all(a.dtype.kind in "biuf" for a in arrays) and len({a.shape[1:] for a in arrays}) == 1:
            joined = np.ascontiguousarray(np.concatenate(arrays))
            head.update(encoding=joined.dtype.str, shape=list(joined.shape))
            write_frame(out, head, memoryview(joined).cast("B"))
            return
        values: list[Any] = []
        for a in arrays:
            values.extend(a.tolist())
    else:
        values = [v for p in parts for v in (p.tolist() if hasattr(p, "tolist") else p)]
    head["encoding"] = "json"
    write_frame(out, head, json.dumps(values, default=_jsonable).encode())


def _jsonable(value: Any) -> Any:
    to_list = getattr(value, "tolist", None)
    if callable(to_list):
        return to_list()
    return str(value)


def serve(batch: Batch, stdin: BinaryIO, stdout: BinaryIO) -> None:
    """Answer requests until the end of ``stdin``."""
    while True:
        header, payload = read_frame(stdin)
        if header is None:
            return
        limit = header.get("limit")
        try:
            if header["encoding"] == "f8":
                import numpy as np

                matrix = np.frombuffer(payload, dtype="<f8").reshape(header["shape"])
                parts, errors = batch.score_matrix(matrix, limit)
            else:
                parts, errors = batch.score_rows(json.loads(payload), limit)
        except TooMany as e:
            write_frame(stdout, {"ok": False, "too_many": True, "errors": e.args[0] if e.args else []})
            continue
        except Exception as e:
            write_frame(stdout, {"ok": False, "error": f"{type(e).__name__}: {_reason(e)}"})
            continue
        _answer(stdout, parts, errors, batch.fast and header["encoding"] == "f8")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m modelcd.scoring.batch")
    parser.add_argument("--model-dir", required=True)
    parser.add_argument("--config", required=True)
    args = parser.parse_args(argv)
    stdin, stdout = sys.stdin.buffer, sys.stdout.buffer
    sys.stdout = sys.stderr  # what the model prints must not reach the pipe
    for name in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ.setdefault(name, "1")
    try:
        batch = Batch(load_scorer(load_config(args.config), args.model_dir))
    except (ConfigError, LoadError) as e:
        write_frame(stdout, {"ok": False, "error": str(e)})
        return 4
    write_frame(stdout, batch.hello())
    serve(batch, stdin, stdout)
    return 0


if __name__ == "__main__":
    sys.exit(main())
