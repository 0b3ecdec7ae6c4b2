"""Training statistics: per-feature counts, missing values, histograms with fixed bins and
category counts of a training-data sample, computed on a stream of chunks in bounded memory.
The input-drift gate and the production watch compare live rows with them
(``analysis.drift.input_psi``). Pure: no I/O besides reading the given file in chunks.

Decisions (also in docs/architecture.md §9):

- **Kind of a feature**: its type in the file decides. Numbers (integers, floats) are
  ``numeric``; everything else (text, booleans, dates) is ``categorical``, its values
  compared as text (``str(value)``). The first chunk fixes the kind; in a later chunk, values
  of a numeric feature that are not numbers count as missing.
- **Missing**: null, NaN and ±inf (numeric), null and NaN (categorical). Missing values have
  a bin of their own, the last of every histogram, so a rise in missing values is drift too.
- **Numeric bins**: edges from the reference's deciles, outer edges ±inf (implicit: only the
  finite inner edges are stored), duplicates collapsed; a bin is ``[e(i-1), e(i))``, so a value
  equal to an edge goes to the bin above it. A feature with at most ``FEW_VALUES`` (20)
  distinct values in the sample gets one bin per value instead (edges at the values themselves).
- **Streaming deciles: a bounded reservoir sample, not two passes.** Rows are sampled
  uniformly without replacement (bottom-k on seeded uniform keys drawn row by row: every row
  has the same chance, and a seed gives the same rows whatever the chunking) into at
  most ``SAMPLE_SIZE`` (100,000) rows. The edges and the bin counts come from that sample, so
  they are exact when the file has at most that many rows and estimates otherwise (the
  standard error of a bin's share is at most 0.5/sqrt(100,000) = 0.0016). ``count``,
  ``missing``, ``min``, ``max``, ``mean`` and ``std`` (sample, ddof=1) are exact over all rows.
- **Categories**: the top ``TOP_CATEGORIES`` (50) by count, the rest in ``other``. At most
  ``TRACKED_CATEGORIES`` (10,000) distinct values are tracked; past that the rarest half is
  folded into ``other`` (``approximate`` is then true and the counts of the top categories are
  lower bounds), so an id-like column cannot grow memory without bound.

Memory is bounded by the chunks in flight (``CHUNK_ROWS`` rows of Parquet, read a row group
at a time, so the size of its row groups counts too; three ``CSV_SEGMENT_BYTES`` segments of
CSV), the sample (``SAMPLE_SIZE`` x numeric features x 8 bytes) and the tracked categories,
whatever the file's size.
"""

from __future__ import annotations

import itertools
import math
import re
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from modelcd.csv_segments import csv_options, parsed_segments
from modelcd.errors import InvalidInput

SCHEMA_VERSION = 1
NUMERIC = "numeric"
CATEGORICAL = "categorical"
DECILES = tuple(i / 10 for i in range(1, 10))
SAMPLE_SIZE = 100_000
FEW_VALUES = 20
TOP_CATEGORIES = 50
TRACKED_CATEGORIES = 10_000
MAX_FEATURES = 1_000
CHUNK_ROWS = 131_072
CSV_BLOCK_BYTES = 1024 * 1024  # compressed CSV and JSON lines: streamed in blocks of this size
CSV_SEGMENT_BYTES = 16 * 1024 * 1024  # uncompressed CSV: segments parsed in parallel
CSV_WORKERS = 2
_COMPRESSED = {".gz", ".bz2", ".zst"}
MISSING_LABEL = "(missing)"
OTHER_LABEL = "(other)"
FORMATS = ("csv", "parquet", "jsonl")


class StatisticsError(InvalidInput):
    """The training data cannot give statistics; the message names the file and the cause."""

    code = "statistics_failed"


@dataclass(frozen=True)
class FeatureStats:
    """What the training data says about one feature.

    ``count`` values present and ``missing`` absent (``count + missing`` = the rows). Numeric:
    ``min``, ``max``, ``mean``, ``std`` over all rows (None when no value is present, ``std``
    when fewer than two); ``edges`` the finite inner bin edges, ``bin_counts`` the sample's
    values per bin (``len(edges) + 1`` bins, summing to ``sampled``), ``distinct`` distinct
    values in the sample. Categorical: ``categories`` the most frequent values (as text) with
    their ``category_counts``, ``other`` the count of every other value, ``distinct`` the
    distinct values seen (a lower bound when ``approximate``)."""

    name: str
    kind: str  # numeric | categorical
    count: int
    missing: int
    min: float | None = None
    max: float | None = None
    mean: float | None = None
    std: float | None = None
    edges: tuple[float, ...] = ()
    bin_counts: tuple[int, ...] = ()
    sampled: int = 0
    categories: tuple[str, ...] = ()
    category_counts: tuple[int, ...] = ()
    other: int = 0
    distinct: int = 0
    approximate: bool = False

    @property
    def numeric(self) -> bool:
        return self.kind == NUMERIC

    @property
    def bins(self) -> int:
        """How many value bins ``bin_counts(self, values)`` returns before its last, the missing bin."""
        return len(self.edges) + 1 if self.numeric else len(self.categories) + 1

    def labels(self) -> list[str]:
        """A label per histogram bin, in ``bin_counts``' order: the value bins, then missing."""
        if self.numeric:
            bounds = ["-inf", *(f"{e:g}" for e in self.edges), "inf"]
            values = [f"[{lo}, {hi})" if lo != "-inf" else f"(-inf, {hi})" for lo, hi in itertools.pairwise(bounds)]
        else:
            values = [*self.categories, OTHER_LABEL]
        return [*values, MISSING_LABEL]

    def reference_weights(self) -> list[float]:
        """The training data's share of each histogram bin (values bins, then missing), summing
        to 1: what ``drift.psi`` compares live ``bin_counts`` with. Numeric bins are the sample's
        shares scaled by the exact share of present values."""
        total = self.count + self.missing
        if total == 0:
            return [0.0] * (self.bins + 1)
        present = self.count / total
        if self.numeric:
            scale = present / self.sampled if self.sampled else 0.0
            values = [c * scale for c in self.bin_counts]
        else:
            values = [c / total for c in (*self.category_counts, self.other)]
        return [*values, self.missing / total]

    def to_dict(self) -> dict[str, Any]:
        common: dict[str, Any] = {"name": self.name, "kind": self.kind, "count": self.count, "missing": self.missing,
                                  "distinct": self.distinct}
        if self.numeric:
            return {**common, "min": self.min, "max": self.max, "mean": self.mean, "std": self.std,
                    "edges": list(self.edges), "bin_counts": list(self.bin_counts), "sampled": self.sampled}
        return {**common, "categories": list(self.categories), "category_counts": list(self.category_counts),
                "other": self.other, "approximate": self.approximate}

    @classmethod
    def from_dict(cls, doc: dict[str, Any]) -> FeatureStats:
        kind = doc["kind"]
        if kind not in (NUMERIC, CATEGORICAL):
            raise ValueError(f"feature {doc.get('name')!r}: unknown kind {kind!r}")
        if kind == NUMERIC:
            return cls(name=str(doc["name"]), kind=kind, count=int(doc["count"]), missing=int(doc["missing"]),
                       min=_opt_float(doc.get("min")), max=_opt_float(doc.get("max")),
                       mean=_opt_float(doc.get("mean")), std=_opt_float(doc.get("std")),
                       edges=tuple(float(e) for e in doc["edges"]), bin_counts=tuple(int(c) for c in doc["bin_counts"]),
                       sampled=int(doc["sampled"]), distinct=int(doc.get("distinct", 0)))
        return cls(name=str(doc["name"]), kind=kind, count=int(doc["count"]), missing=int(doc["missing"]),
                   categories=tuple(str(c) for c in doc["categories"]),
                   category_counts=tuple(int(c) for c in doc["category_counts"]), other=int(doc["other"]),
                   distinct=int(doc.get("distinct", 0)), approximate=bool(doc.get("approximate", False)))


@dataclass(frozen=True)
class DatasetStats:
    """Statistics of a training-data sample: ``rows`` and one ``FeatureStats`` per column, in
    the file's column order. ``sample_size`` and ``seed`` say how numeric bins were sampled."""

    rows: int
    features: tuple[FeatureStats, ...]
    sample_size: int = SAMPLE_SIZE
    seed: int = 0
    schema_version: int = SCHEMA_VERSION
    _by_name: dict[str, FeatureStats] = field(default_factory=dict, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        self._by_name.update((f.name, f) for f in self.features)

    @property
    def names(self) -> list[str]:
        return [f.name for f in self.features]

    def feature(self, name: str) -> FeatureStats:
        try:
            return self._by_name[name]
        except KeyError:
            raise KeyError(f"no feature {name!r}; the statistics have {', '.join(self.names[:20])}") from None

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON values (no NaN or infinity)."""
        return {"schema_version": self.schema_version, "rows": self.rows, "sample_size": self.sample_size,
                "seed": self.seed, "features": [f.to_dict() for f in self.features]}

    @classmethod
    def from_dict(cls, doc: dict[str, Any]) -> DatasetStats:
        version = int(doc.get("schema_version", 0))
        if not 1 <= version <= SCHEMA_VERSION:
            raise ValueError(f"statistics schema version {version} is not one this modelcd reads "
                             f"(1 to {SCHEMA_VERSION}); compute them again")
        return cls(rows=int(doc["rows"]), features=tuple(FeatureStats.from_dict(f) for f in doc["features"]),
                   sample_size=int(doc.get("sample_size", SAMPLE_SIZE)), seed=int(doc.get("seed", 0)),
                   schema_version=version)


def _opt_float(value: Any) -> float | None:
    return None if value is None else float(value)


def _finite_or_none(value: float) -> float | None:
    return float(value) if math.isfinite(value) else None


# -- accumulators -----------------------------------------------------------------------------


class _Numeric:
    """Exact count, missing, min, max, mean and M2 (Chan et al.'s pairwise update) of a stream."""

    def __init__(self) -> None:
        self.n = 0
        self.missing = 0
        self.mean = 0.0
        self.m2 = 0.0
        self.lo = math.inf
        self.hi = -math.inf

    def add(self, x: np.ndarray) -> None:
        finite = np.isfinite(x)
        k = int(np.count_nonzero(finite))
        if k < x.size:
            self.missing += x.size - k
            x = x[finite]
        if k == 0:
            return
        with np.errstate(over="ignore", invalid="ignore"):
            chunk_mean = float(x.mean())
            d = x - chunk_mean
            chunk_m2 = float(np.einsum("i,i->", d, d))  # not BLAS: its threads spin on a busy machine
            n = self.n + k
            delta = chunk_mean - self.mean
            self.mean += delta * k / n
            self.m2 += chunk_m2 + delta * delta * self.n * k / n
        self.n = n
        self.lo = min(self.lo, float(x.min()))
        self.hi = max(self.hi, float(x.max()))


class _Categorical:
    """Counts per value (as text), bounded by ``TRACKED_CATEGORIES`` (space-saving style pruning)."""

    def __init__(self, tracked: int = TRACKED_CATEGORIES) -> None:
        self.counts: dict[str, int] = {}
        self.missing = 0
        self.present = 0
        self.tracked = tracked
        self.approximate = False

    def add(self, s: pd.Series) -> None:
        counts = s.value_counts(dropna=True, sort=False)
        present = int(counts.sum())
        self.missing += len(s) - present
        self.present += present
        for key, c in zip(counts.index, counts.to_numpy(), strict=True):
            k = str(key)
            self.counts[k] = self.counts.get(k, 0) + int(c)
        if len(self.counts) > self.tracked:
            keep = sorted(self.counts.items(), key=lambda kv: -kv[1])[: self.tracked // 2]
            self.counts = dict(keep)
            self.approximate = True


class _RowSample:
    """A uniform sample of at most ``size`` rows (their numeric values), by bottom-k on seeded
    uniform keys: a row enters when its key is below the largest key kept."""

    def __init__(self, size: int, width: int, seed: int) -> None:
        self.size = size
        self.width = width
        self.rng = np.random.default_rng(seed)
        self.keys = np.empty(0)
        self.values = np.empty((width, 0))  # one row per feature: a feature's sample is contiguous
        self.threshold = math.inf

    def add(self, columns: Sequence[np.ndarray], n: int) -> None:
        if not columns or n == 0:
            return
        keys = self.rng.random(n)
        if self.keys.size < self.size:  # filling: take rows until full, then go on as below
            room = self.size - self.keys.size
            first = min(room, n)
            self.keys = np.concatenate([self.keys, keys[:first]])
            self.values = np.concatenate([self.values, np.stack([c[:first] for c in columns])], axis=1)
            if self.keys.size == self.size:
                self.threshold = float(self.keys.max())
            if first == n:
                return
            keys, columns, n = keys[first:], [c[first:] for c in columns], n - first
        take = np.flatnonzero(keys < self.threshold)
        if take.size == 0:
            return
        # the size smallest keys of the sample and the newcomers; newcomers replace evicted rows in place
        new_keys = keys[take]
        keep = np.argpartition(np.concatenate([self.keys, new_keys]), self.size - 1)[: self.size]
        kept = np.zeros(self.size + take.size, dtype=bool)
        kept[keep] = True
        evicted = np.flatnonzero(~kept[: self.size])
        incoming = np.flatnonzero(kept[self.size:])
        if incoming.size:
            rows = take[incoming]
            self.keys[evicted] = new_keys[incoming]
            for j, col in enumerate(columns):
                self.values[j, evicted] = col[rows]
        self.threshold = float(self.keys.max())


def as_float(values: Any) -> np.ndarray:
    """``values`` (a Series, array or sequence) as float64 with NaN for missing; what cannot be
    read as a number becomes NaN."""
    s = values if isinstance(values, pd.Series) else pd.Series(values)
    if pd.api.types.is_bool_dtype(s.dtype):
        return s.astype("float64").to_numpy()
    try:
        return s.to_numpy(dtype=np.float64, na_value=np.nan)
    except (TypeError, ValueError):
        return pd.to_numeric(s, errors="coerce").to_numpy(dtype=np.float64, na_value=np.nan)


def is_numeric_dtype(dtype: Any) -> bool:
    return bool(pd.api.types.is_numeric_dtype(dtype)) and not pd.api.types.is_bool_dtype(dtype)


# -- computing --------------------------------------------------------------------------------


def compute_statistics(chunks: Iterable[pd.DataFrame], *, sample_size: int = SAMPLE_SIZE, seed: int = 0,
                       top: int = TOP_CATEGORIES, max_features: int = MAX_FEATURES) -> DatasetStats:
    """Statistics of the rows of ``chunks`` (DataFrames with the same columns), read once, in
    memory bounded by one chunk, the row sample and the tracked categories. StatisticsError
    when there are no rows or columns, or the chunks disagree on their columns."""
    names: list[str] | None = None
    kinds: dict[str, str] = {}
    numeric: dict[str, _Numeric] = {}
    categorical: dict[str, _Categorical] = {}
    sample: _RowSample | None = None
    rows = 0
    for chunk in chunks:
        columns = [str(c) for c in chunk.columns]
        if names is None:
            names = _check_columns(columns, max_features)
            for name, dtype in zip(names, chunk.dtypes, strict=True):
                kinds[name] = NUMERIC if is_numeric_dtype(dtype) else CATEGORICAL
            numeric = {n: _Numeric() for n in names if kinds[n] == NUMERIC}
            categorical = {n: _Categorical() for n in names if kinds[n] == CATEGORICAL}
            sample = _RowSample(sample_size, len(numeric), seed)
        elif columns != names:
            raise StatisticsError(f"a chunk has columns {columns[:10]} where the first had {names[:10]}; "
                                  "every chunk must have the same columns")
        n = len(chunk)
        if n == 0:
            continue
        rows += n
        numeric_columns = []
        for position, name in enumerate(names):
            series = chunk.iloc[:, position]
            if kinds[name] == NUMERIC:
                x = as_float(series)
                numeric[name].add(x)
                numeric_columns.append(x)
            else:
                categorical[name].add(series)
        assert sample is not None
        sample.add(numeric_columns, n)
    if names is None or rows == 0:
        raise StatisticsError("no rows: the training data has a header at most; send rows of training data")
    assert sample is not None
    features = []
    j = 0
    for name in names:
        if kinds[name] == NUMERIC:
            features.append(_numeric_feature(name, numeric[name], sample.values[j]))
            j += 1
        else:
            features.append(_categorical_feature(name, categorical[name], top))
    return DatasetStats(rows=rows, features=tuple(features), sample_size=sample_size, seed=seed)


def _check_columns(columns: list[str], max_features: int) -> list[str]:
    if not columns:
        raise StatisticsError("no columns: the training data needs a header row naming its features")
    if len(columns) > max_features:
        raise StatisticsError(f"{len(columns)} columns: modelcd keeps statistics of at most {max_features} features; "
                              "send the model's input columns only")
    seen: set[str] = set()
    for c in columns:
        if c in seen:
            raise StatisticsError(f"column {c!r} appears twice; give every feature its own name")
        seen.add(c)
    return columns


def _numeric_feature(name: str, acc: _Numeric, sampled: np.ndarray) -> FeatureStats:
    values = np.sort(sampled[np.isfinite(sampled)])
    edges, counts, distinct = numeric_bins(values, presorted=True)
    std = math.sqrt(acc.m2 / (acc.n - 1)) if acc.n > 1 and math.isfinite(acc.m2) else None
    return FeatureStats(
        name=name, kind=NUMERIC, count=acc.n, missing=acc.missing,
        min=acc.lo if acc.n else None, max=acc.hi if acc.n else None,
        mean=_finite_or_none(acc.mean) if acc.n else None, std=_finite_or_none(std) if std is not None else (
            0.0 if acc.n == 1 else None),
        edges=edges, bin_counts=counts, sampled=int(values.size), distinct=distinct)


def numeric_bins(values: np.ndarray, quantiles: Sequence[float] = DECILES, few: int = FEW_VALUES,
                 presorted: bool = False) -> tuple[tuple[float, ...], tuple[int, ...], int]:
    """(inner edges, counts per bin, distinct values) of finite ``values``: edges at the
    ``quantiles`` (duplicates collapsed), or at the distinct values themselves when there are
    at most ``few`` of them. Bins are ``[e(i-1), e(i))`` with outer edges ±inf."""
    v = values if presorted else np.sort(values[np.isfinite(values)])
    if v.size == 0:
        return (), (0,), 0
    distinct = 1 + int(np.count_nonzero(v[1:] != v[:-1]))
    if distinct <= few:
        edges = np.unique(v)[1:]
    else:
        with np.errstate(over="ignore", invalid="ignore"):
            q = np.quantile(v, list(quantiles))
        edges = np.unique(q[np.isfinite(q)])
    positions = np.searchsorted(v, edges, side="left")
    counts = np.diff(np.concatenate([[0], positions, [v.size]]))
    return tuple(float(e) for e in edges), tuple(int(c) for c in counts), distinct


def _categorical_feature(name: str, acc: _Categorical, top: int) -> FeatureStats:
    ranked = sorted(acc.counts.items(), key=lambda kv: (-kv[1], kv[0]))[:top]
    kept = sum(c for _, c in ranked)
    return FeatureStats(
        name=name, kind=CATEGORICAL, count=acc.present, missing=acc.missing,
        categories=tuple(k for k, _ in ranked), category_counts=tuple(c for _, c in ranked),
        other=acc.present - kept, distinct=len(acc.counts), approximate=acc.approximate)


# -- histograms of new values -----------------------------------------------------------------


def bin_counts(feature: FeatureStats, values: Any) -> list[int]:
    """Histogram of new ``values`` (a Series, array or sequence) with the feature's stored
    edges or categories: ``feature.bins`` value bins then the missing count (``feature.labels()``
    names them). Categorical values are compared as text; an unseen category counts in the
    "other" bin. For a numeric feature, a value that is not a number counts as missing."""
    if feature.numeric:
        x = as_float(values)
        finite = np.isfinite(x)
        present = x[finite]
        counts = np.bincount(np.searchsorted(np.asarray(feature.edges, dtype=np.float64), present, side="right"),
                             minlength=len(feature.edges) + 1)
        return [*(int(c) for c in counts), int(x.size - present.size)]
    s = values if isinstance(values, pd.Series) else pd.Series(list(values), dtype=object)
    index = {c: i for i, c in enumerate(feature.categories)}
    out = [0] * (len(feature.categories) + 2)
    seen = s.value_counts(dropna=True, sort=False)
    for key, c in zip(seen.index, seen.to_numpy(), strict=True):
        out[index.get(str(key), len(feature.categories))] += int(c)
    out[-1] = len(s) - int(seen.sum())
    return out


# -- files ------------------------------------------------------------------------------------


_CSV_COLUMN_ERROR = re.compile(r"In CSV column #(\d+): (?:Row #\d+: )?CSV conversion error to (\w+)")
_TEXT_SUFFIXES = {".csv": ",", ".tsv": "\t", ".txt": ","}


def detect_format(path: Path, name: str | None = None) -> str:
    """``csv``, ``parquet`` or ``jsonl`` from the file's first bytes and its name's suffix
    (``name``: the name it was given, when ``path`` is a temporary). StatisticsError naming the
    file when it is none of them."""
    shown = name or path.name
    with path.open("rb") as f:
        head = f.read(65536)
    suffixes = [s.lower() for s in Path(shown).suffixes]
    compressed = bool(suffixes) and suffixes[-1] in _COMPRESSED
    plain = suffixes[-2] if compressed and len(suffixes) > 1 else (suffixes[-1] if suffixes else "")
    if head[:4] == b"PAR1":
        return "parquet"
    if plain in (".parquet", ".pq"):
        raise StatisticsError(f"{shown} is not a Parquet file (it does not start with PAR1); send CSV, Parquet "
                              "or JSON lines", field="data")
    if not head:
        raise StatisticsError(f"{shown} is empty: no rows; send CSV (with a header), Parquet or JSON lines",
                              field="data")
    if compressed:
        if plain in (".jsonl", ".ndjson", ".json"):
            return "jsonl"
        if plain in _TEXT_SUFFIXES:
            return "csv"
    elif b"\x00" not in head and _is_text(head):
        if plain in (".jsonl", ".ndjson", ".json") or head.lstrip()[:1] == b"{":
            return "jsonl"
        if plain in ("", *_TEXT_SUFFIXES):
            return "csv"
    raise StatisticsError(f"{shown} is not CSV, Parquet or JSON lines (binary data, or a {plain or 'suffix-less'} "
                          "file); send the training data as .csv (with a header row), .parquet or .jsonl",
                          field="data")


def _is_text(head: bytes) -> bool:
    try:
        head.decode("utf-8")
    except UnicodeDecodeError as e:
        return e.start >= len(head) - 4  # a character cut at the end of the read
    return True


def read_chunks(path: Path, fmt: str, *, promote: dict[str, str] | None = None,
                block_bytes: int = CSV_BLOCK_BYTES, chunk_rows: int = CHUNK_ROWS,
                segment_bytes: int = CSV_SEGMENT_BYTES, workers: int = CSV_WORKERS) -> Iterator[pd.DataFrame]:
    """The rows of ``path`` (format ``fmt``) as DataFrames of a bounded size. Parquet: a row
    group at a time, in chunks of ``chunk_rows``. CSV: segments of about ``segment_bytes``
    (cut at line ends) parsed by ``workers`` threads, at most ``workers + 1`` in flight, in file
    order; a compressed CSV and JSON lines are streamed in blocks of ``block_bytes``. Column
    types of CSV and JSON lines come from the first segment or block (``promote`` overrides
    some: column name → arrow type name)."""
    import pyarrow as pa

    if fmt == "parquet":
        import pyarrow.parquet as pq

        # one row group at a time: iter_batches over the whole file reads many groups ahead (here
        # 274 MB of arrow memory for 1 M x 20 floats in groups of 131,072 rows; 67 MB this way)
        with pq.ParquetFile(path) as pf:
            for group in range(pf.num_row_groups):
                if pf.metadata.row_group(group).num_rows <= 4 * chunk_rows:
                    table = pf.read_row_group(group)
                    for start in range(0, table.num_rows, chunk_rows):
                        yield table.slice(start, chunk_rows).to_pandas()
                    del table
                else:  # a large group: decoded a batch at a time (its column chunks are still read whole)
                    for batch in pf.iter_batches(batch_size=chunk_rows, row_groups=[group]):
                        yield batch.to_pandas()
        return
    suffixes = [s.lower() for s in path.suffixes]
    if fmt == "csv" and not _COMPRESSED.intersection(suffixes):
        yield from _csv_segments(path, "\t" if ".tsv" in suffixes else ",", promote or {}, segment_bytes, workers)
        return
    if fmt == "jsonl":
        import pyarrow.json as pj

        reader = pj.open_json(pa.input_stream(str(path), compression="detect"),
                              read_options=pj.ReadOptions(block_size=block_bytes))
    else:
        import pyarrow.csv as pc

        types = {name: getattr(pa, t)() for name, t in (promote or {}).items()}
        reader = pc.open_csv(pa.input_stream(str(path), compression="detect"),
                             read_options=pc.ReadOptions(block_size=block_bytes),
                             parse_options=pc.ParseOptions(delimiter="\t" if ".tsv" in suffixes else ","),
                             convert_options=pc.ConvertOptions(strings_can_be_null=True, column_types=types))
    with reader:  # small blocks (arrow holds ~25 of them), gathered into chunks of about chunk_rows
        pending: list[Any] = []
        rows = 0
        for batch in reader:
            pending.append(batch)
            rows += batch.num_rows
            if rows >= chunk_rows:
                yield pa.Table.from_batches(pending).to_pandas()
                pending, rows = [], 0
        if pending:
            yield pa.Table.from_batches(pending).to_pandas()


def _csv_segments(path: Path, delimiter: str, promote: dict[str, str], segment_bytes: int,
                  workers: int) -> Iterator[pd.DataFrame]:
    """An uncompressed CSV file parsed in segments by ``workers`` threads (csv_segments), the
    ``promote`` columns read as the arrow types named."""
    import pyarrow as pa
    import pyarrow.csv as pc

    read_options, parse_options = csv_options(path, delimiter)

    def parse(raw: bytes, types: dict[str, Any]) -> tuple[Any, pd.DataFrame]:
        table = pc.read_csv(pa.BufferReader(raw), read_options=read_options, parse_options=parse_options,
                            convert_options=pc.ConvertOptions(strings_can_be_null=True, column_types=types))
        return table.schema, table.to_pandas()

    promoted = {name: getattr(pa, t)() for name, t in promote.items()}
    yield from parsed_segments(path, parse, types=promoted, segment_bytes=segment_bytes, workers=workers,
                               thread_name="csv-parse")


def statistics_from_file(path: Path | str, *, name: str | None = None, sample_size: int = SAMPLE_SIZE,
                         seed: int = 0, progress: Callable[[int], None] | None = None,
                         segment_bytes: int = CSV_SEGMENT_BYTES) -> DatasetStats:
    """Statistics of a CSV (header row; ``.tsv`` tab-separated; ``.gz`` compressed), Parquet or
    JSON lines file, read in chunks. ``progress(rows so far)`` is called after each chunk (it
    may raise to stop). A CSV column typed from the first segment that later holds other values
    (integers, then decimals or text) is read again as a wider type. StatisticsError names the
    file (``name``, else the path's name) and the cause."""
    path = Path(path)
    shown = name or path.name
    fmt = detect_format(path, shown)
    promote: dict[str, str] = {}
    for _ in range(MAX_FEATURES + 1):
        try:
            chunks = read_chunks(path, fmt, promote=promote, segment_bytes=segment_bytes)
            return compute_statistics(_counted(chunks, progress),
                                      sample_size=sample_size, seed=seed)
        except StatisticsError as e:
            raise StatisticsError(f"{shown}: {e.message}", field="data") from None
        except _Stopped as stopped:
            raise stopped.cause from None
        except Exception as e:
            wider = _wider_csv_type(e, path, promote) if fmt == "csv" else None
            if wider is None:
                raise StatisticsError(f"{shown}: cannot be read as {fmt.upper()}: {_arrow_message(e)}",
                                      field="data") from None
            promote[wider[0]] = wider[1]
    raise StatisticsError(f"{shown}: column types keep changing; give every column one type", field="data")


class _Stopped(Exception):
    """What ``progress`` raised, carried past the reading errors' handling."""

    def __init__(self, cause: BaseException) -> None:
        super().__init__(str(cause))
        self.cause = cause


def _counted(chunks: Iterator[pd.DataFrame], progress: Callable[[int], None] | None) -> Iterator[pd.DataFrame]:
    rows = 0
    for chunk in chunks:
        rows += len(chunk)
        yield chunk
        if progress is not None:
            try:
                progress(rows)
            except Exception as e:
                raise _Stopped(e) from e


def _wider_csv_type(e: Exception, path: Path, promote: dict[str, str]) -> tuple[str, str] | None:
    """(column, wider arrow type) after a CSV conversion error of a column typed from the first block."""
    match = _CSV_COLUMN_ERROR.search(str(e))
    if match is None:
        return None
    import pyarrow as pa
    import pyarrow.csv as pc

    with pc.open_csv(pa.input_stream(str(path), compression="detect"),
                     read_options=pc.ReadOptions(block_size=65536)) as reader:
        names = reader.schema.names
    position = int(match.group(1))
    if position >= len(names):
        return None
    column, current = names[position], match.group(2)
    if promote.get(column) == "string":
        return None
    return column, "float64" if current.startswith(("int", "uint", "null")) and column not in promote else "string"


def _arrow_message(e: Exception) -> str:
    text = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    return text[:300]
