"""Training statistics: exact moments over every row, decile bins from a bounded seeded sample,
categories with an "other" bucket, missing values in a bin of their own, the three file formats
read in chunks, and errors that name the file and the cause."""

from __future__ import annotations

import gzip
import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from modelcd.analysis.statistics import (
    CATEGORICAL,
    NUMERIC,
    DatasetStats,
    FeatureStats,
    StatisticsError,
    bin_counts,
    compute_statistics,
    read_chunks,
    statistics_from_file,
)


def _chunks(df: pd.DataFrame, size: int) -> list[pd.DataFrame]:
    return [df.iloc[i:i + size] for i in range(0, len(df), size)]


def test_numeric_moments_are_exact_over_every_row_and_chunking_does_not_change_them() -> None:
    rng = np.random.default_rng(3)
    x = rng.normal(5.0, 2.0, 50_000)
    x[::10] = np.nan
    df = pd.DataFrame({"x": x})
    whole = compute_statistics([df]).feature("x")
    pieces = compute_statistics(_chunks(df, 777)).feature("x")
    present = x[~np.isnan(x)]
    for f in (whole, pieces):
        assert f.kind == NUMERIC and f.count == present.size and f.missing == 5_000
        assert f.min == present.min() and f.max == present.max()
        assert f.mean == pytest.approx(present.mean(), rel=1e-12)
        assert f.std == pytest.approx(present.std(ddof=1), rel=1e-9)
    assert whole.edges == pieces.edges  # under the sample size the sample is every row: exact either way


def test_decile_edges_split_the_reference_into_tenths_with_open_outer_bins() -> None:
    x = np.arange(1000, dtype=float)
    f = compute_statistics([pd.DataFrame({"x": x})]).feature("x")
    assert len(f.edges) == 9 and list(f.bin_counts) == [100] * 10 and f.sampled == 1000
    assert f.labels()[0].startswith("(-inf, ") and f.labels()[-2].endswith(", inf)") and f.labels()[-1] == "(missing)"
    # a value on an edge goes to the bin above it; below the first edge and above the last are open
    assert bin_counts(f, [-1e9, f.edges[0], 1e9, None, float("nan"), float("inf")]) == [1, 1, 0, 0, 0, 0, 0, 0, 0,
                                                                                         1, 3]


def test_duplicate_deciles_collapse_and_few_values_get_a_bin_each() -> None:
    skewed = np.concatenate([np.zeros(700), np.arange(1, 301, dtype=float)])
    f = compute_statistics([pd.DataFrame({"x": skewed})]).feature("x")
    assert len(set(f.edges)) == len(f.edges) and len(f.edges) < 9
    assert sum(f.bin_counts) == 1000 and f.bin_counts[0] == 0  # nothing below 0, the lowest decile
    few = compute_statistics([pd.DataFrame({"k": [1, 2, 2, 3, 3, 3, 7] * 100})]).feature("k")
    assert few.kind == NUMERIC and few.edges == (2.0, 3.0, 7.0) and few.bin_counts == (100, 200, 300, 100)
    assert bin_counts(few, [1, 2.0, 3, 5, 7, 100]) == [1, 1, 2, 2, 0]


def test_categorical_top_categories_other_bucket_and_unseen_values() -> None:
    values = [f"c{i}" for i in range(60) for _ in range(60 - i)] + [None] * 7
    f = compute_statistics([pd.DataFrame({"city": values})], top=50).feature("city")
    assert f.kind == CATEGORICAL and f.count == sum(range(1, 61)) and f.missing == 7 and f.distinct == 60
    assert f.categories[:3] == ("c0", "c1", "c2") and len(f.categories) == 50
    assert f.other == sum(60 - i for i in range(50, 60))
    counts = bin_counts(f, ["c0", "c0", "c59", "never-seen", None])
    assert counts[0] == 2 and counts[50] == 2 and counts[51] == 1 and len(counts) == 52


def test_booleans_and_text_are_categorical_numbers_numeric() -> None:
    df = pd.DataFrame({"flag": [True, False, True, True], "name": ["a", "b", "a", "c"], "n": [1, 2, 3, 4],
                       "f": [0.5, 1.5, None, 2.0]})
    stats = compute_statistics([df])
    assert [(f.name, f.kind) for f in stats.features] == [("flag", CATEGORICAL), ("name", CATEGORICAL),
                                                          ("n", NUMERIC), ("f", NUMERIC)]
    assert stats.feature("flag").categories == ("True", "False") and stats.rows == 4
    assert bin_counts(stats.feature("flag"), [True, False, None]) == [1, 1, 0, 1]


def test_reservoir_sample_is_bounded_seeded_and_representative() -> None:
    rng = np.random.default_rng(7)
    df = pd.DataFrame({"u": rng.uniform(0, 1, 200_000)})
    a = compute_statistics(_chunks(df, 30_000), sample_size=5_000, seed=1).feature("u")
    b = compute_statistics(_chunks(df, 30_000), sample_size=5_000, seed=1).feature("u")
    c = compute_statistics(_chunks(df, 30_000), sample_size=5_000, seed=2).feature("u")
    assert a == b and a.edges != c.edges
    d = compute_statistics(_chunks(df, 7_777), sample_size=5_000, seed=1).feature("u")
    assert (d.edges, d.bin_counts) == (a.edges, a.bin_counts)  # the same rows sampled whatever the chunking
    assert a.sampled == 5_000 and sum(a.bin_counts) == 5_000 and a.count == 200_000
    assert np.allclose(a.edges, np.arange(0.1, 1.0, 0.1), atol=0.02)  # deciles of U(0, 1), from 5,000 of 200,000


def test_sample_covers_rows_from_the_whole_stream_not_just_the_start() -> None:
    df = pd.DataFrame({"x": np.repeat([0.0, 100.0], 50_000)})  # sorted: a sample of the first rows would see 0 only
    f = compute_statistics(_chunks(df, 10_000), sample_size=2_000).feature("x")
    assert f.edges == (100.0,) and 800 < f.bin_counts[1] < 1_200


def test_reference_weights_scale_the_sample_by_the_exact_present_share() -> None:
    df = pd.DataFrame({"x": [1.0, 2.0, None, None], "c": ["a", None, "b", "a"]})
    stats = compute_statistics([df])
    assert stats.feature("x").reference_weights() == [0.25, 0.25, 0.5]
    assert stats.feature("c").reference_weights() == [0.5, 0.25, 0.0, 0.25]


def test_to_dict_is_plain_json_and_round_trips() -> None:
    df = pd.DataFrame({"x": [1.0, 2.0, np.inf, -np.inf, np.nan, 3.0], "s": ["a", "b", None, "a", "a", "z"],
                       "empty": [None] * 6})
    stats = compute_statistics([df])
    doc = stats.to_dict()
    text = json.dumps(doc, allow_nan=False)
    again = DatasetStats.from_dict(json.loads(text))
    assert again == stats and doc["schema_version"] == 1 and [f["name"] for f in doc["features"]] == ["x", "s",
                                                                                                       "empty"]
    assert stats.feature("x").missing == 3  # ±inf count as missing
    with pytest.raises(ValueError, match="schema version 99"):
        DatasetStats.from_dict({**doc, "schema_version": 99})


def test_a_single_value_and_an_all_missing_column() -> None:
    stats = compute_statistics([pd.DataFrame({"one": [4.0], "none": [np.nan]})])
    one, none = stats.feature("one"), stats.feature("none")
    assert (one.count, one.std, one.mean, one.edges, one.bin_counts) == (1, 0.0, 4.0, (), (1,))
    assert (none.count, none.missing, none.min, none.mean, none.std) == (0, 1, None, None, None)
    assert isinstance(none, FeatureStats) and bin_counts(none, [1.0, None]) == [1, 1]


def test_overflowing_values_give_no_infinities() -> None:
    stats = compute_statistics([pd.DataFrame({"big": [1e308, 1e308, -1e308, 5.0] * 10})])
    json.dumps(stats.to_dict(), allow_nan=False)


def test_no_rows_no_columns_and_duplicate_columns_are_refused() -> None:
    with pytest.raises(StatisticsError, match="no rows"):
        compute_statistics([pd.DataFrame({"a": []})])
    with pytest.raises(StatisticsError, match="no rows"):
        compute_statistics([])
    with pytest.raises(StatisticsError, match="appears twice"):
        compute_statistics([pd.DataFrame([[1, 2]], columns=["a", "a"])])
    with pytest.raises(StatisticsError, match="same columns"):
        compute_statistics([pd.DataFrame({"a": [1]}), pd.DataFrame({"b": [1]})])


def _frame(n: int = 5_000) -> pd.DataFrame:
    rng = np.random.default_rng(11)
    return pd.DataFrame({"a": rng.normal(size=n), "b": rng.integers(0, 1000, n),
                         "color": rng.choice(["red", "green", "blue"], n)})


def test_csv_parquet_and_json_lines_give_the_same_statistics(tmp_path: Path) -> None:
    df = _frame()
    df.to_csv(tmp_path / "t.csv", index=False)
    pq.write_table(pa.Table.from_pandas(df, preserve_index=False), tmp_path / "t.parquet", row_group_size=700)
    df.to_json(tmp_path / "t.jsonl", orient="records", lines=True)
    with gzip.open(tmp_path / "t.csv.gz", "wt") as f:
        df.to_csv(f, index=False)
    results = [statistics_from_file(tmp_path / name) for name in ("t.csv", "t.parquet", "t.jsonl", "t.csv.gz")]
    reference = compute_statistics([df]).to_dict()
    for stats in results:
        doc = stats.to_dict()
        assert doc["rows"] == 5_000 and [f["kind"] for f in doc["features"]] == [NUMERIC, NUMERIC, CATEGORICAL]
        for got, want in zip(doc["features"], reference["features"], strict=True):
            assert got.keys() == want.keys()
            for key in got:
                if isinstance(want[key], float):
                    assert got[key] == pytest.approx(want[key], rel=1e-9), key
                elif key == "edges":
                    assert got[key] == pytest.approx(want[key], rel=1e-9)
                else:
                    assert got[key] == want[key], key


def test_csv_is_read_in_bounded_chunks(tmp_path: Path) -> None:
    _frame(20_000).to_csv(tmp_path / "t.csv", index=False)
    sizes = [len(c) for c in read_chunks(tmp_path / "t.csv", "csv", segment_bytes=64 * 1024)]
    assert sum(sizes) == 20_000 and len(sizes) > 3 and max(sizes) < 6_000


def test_parquet_is_read_a_row_group_at_a_time_in_bounded_chunks(tmp_path: Path) -> None:
    table = pa.Table.from_pandas(_frame(10_000), preserve_index=False)
    pq.write_table(table, tmp_path / "small-groups.parquet", row_group_size=700)
    pq.write_table(table, tmp_path / "one-group.parquet", row_group_size=10_000)
    for name in ("small-groups.parquet", "one-group.parquet"):
        sizes = [len(c) for c in read_chunks(tmp_path / name, "parquet", chunk_rows=500)]
        assert sum(sizes) == 10_000 and max(sizes) <= 500, name


def test_a_csv_column_whose_type_changes_after_the_first_block_is_read_again_wider(tmp_path: Path) -> None:
    lines = ["n,t"] + [f"{i},{i % 3}" for i in range(60_000)] + ["2.5,text"]
    (tmp_path / "t.csv").write_text("\n".join(lines) + "\n")
    stats = statistics_from_file(tmp_path / "t.csv", segment_bytes=64 * 1024)
    n, t = stats.feature("n"), stats.feature("t")
    assert n.kind == NUMERIC and n.count == 60_001 and n.max == 59_999 and n.min == 0
    assert t.kind == CATEGORICAL and "text" in t.categories and t.count == 60_001


def test_tab_separated_and_quoted_names(tmp_path: Path) -> None:
    (tmp_path / "t.tsv").write_text('"a, b"\tc\n1.5\tx\n2.5\ty\n')
    stats = statistics_from_file(tmp_path / "t.tsv")
    assert stats.names == ["a, b", "c"] and stats.feature("a, b").mean == 2.0


def test_progress_is_called_and_what_it_raises_stops_the_reading(tmp_path: Path) -> None:
    _frame(20_000).to_csv(tmp_path / "t.csv", index=False)
    seen: list[int] = []
    statistics_from_file(tmp_path / "t.csv", progress=seen.append)
    assert seen and seen[-1] == 20_000

    class Stop(Exception):
        pass

    def stop(rows: int) -> None:
        raise Stop

    with pytest.raises(Stop):
        statistics_from_file(tmp_path / "t.csv", progress=stop)


@pytest.mark.parametrize(("name", "content", "cause"), [
    ("model.pkl", b"\x80\x04\x95\x00\x00binary\x00pickle", "not CSV, Parquet or JSON lines"),
    ("data.csv", b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR", "not CSV, Parquet or JSON lines"),
    ("data.parquet", b"a,b\n1,2\n", "not a Parquet file"),
    ("empty.csv", b"", "empty"),
    ("header.csv", b"a,b,c\n", "no rows"),
    ("ragged.csv", b"a,b\n1,2\n3,4,5\n", "cannot be read as CSV"),
    ("bad.jsonl", b'{"a": 1}\n{"a": \n', "cannot be read as JSONL"),
])
def test_bad_files_name_the_file_and_the_cause(tmp_path: Path, name: str, content: bytes, cause: str) -> None:
    (tmp_path / name).write_bytes(content)
    with pytest.raises(StatisticsError) as e:
        statistics_from_file(tmp_path / name)
    assert name in e.value.message and cause in e.value.message and e.value.field == "data"


def test_the_given_name_is_what_errors_show(tmp_path: Path) -> None:
    path = tmp_path / "training-data.csv"
    path.write_bytes(b"a\n")
    with pytest.raises(StatisticsError, match=r"^my data\.csv: no rows"):
        statistics_from_file(path, name="my data.csv")


def test_the_sample_stays_bounded_whatever_the_rows() -> None:
    """The sample holds at most sample_size rows however many stream by."""
    chunks = (pd.DataFrame({"x": np.full(50_000, float(i))}) for i in range(40))
    stats = compute_statistics(chunks, sample_size=1_000)
    f = stats.feature("x")
    assert stats.rows == 2_000_000 and f.sampled == 1_000 and f.count == 2_000_000
    assert math.isclose(f.mean or 0.0, 19.5)
