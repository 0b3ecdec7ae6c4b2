"""The batch scoring engine with a real bundle built by modelcd (the iris LogisticRegression
and an entry-script model): local CSV / Parquet / JSON lines files and folders, a moto S3
prefix, a SQLite table through a connection; bad rows, max_errors, Stop, bad arguments."""

from __future__ import annotations

import io
import os
import re
import signal
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import boto3
import joblib
import numpy as np
import pandas as pd
import psutil
import pytest
import sqlalchemy

from modelcd.batch import datasets
from modelcd.batch.datasets import Connections
from modelcd.batch.scoring import BatchResult, score_dataset
from modelcd.builders.bundle import build_bundle
from modelcd.config import load_settings
from modelcd.context import Context, build_context
from modelcd.errors import BatchFailed, Cancelled, InvalidInput
from modelcd.fsutil import is_temporary
from modelcd.registry.archive import pack_tree
from modelcd.registry.service import parse_metadata
from modelcd.targets.process import inherited_env
from modelcd.targets.warm import WarmStarts
from tests.conftest import SUM_OF_ROWS, custom_model, free_port, iris_model
from tests.registry.conftest import aws_env, moto_endpoint  # noqa: F401 - fixtures

COLUMNS = ["sepal_length", "sepal_width", "petal_length", "petal_width"]


@pytest.fixture(scope="module")
def shared(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """One home for the module (the bundle's environment is built once), the iris model
    registered as v1 and an entry-script model summing each row; the warm parents the runs
    started are stopped at the end."""
    root = tmp_path_factory.mktemp("batch")
    ctx = _context(root / "home")
    meta = iris_model(root / "iris")
    ctx.registry.register("iris", io.BytesIO(pack_tree(root / "iris")), parse_metadata(meta))
    custom_model(root / "summer", SUM_OF_ROWS)
    ctx.registry.register("summer", io.BytesIO(pack_tree(root / "summer")),
                          parse_metadata(custom_model(root / "summer", SUM_OF_ROWS)))
    ctx.db.dispose()
    yield {"home": root / "home", "model": joblib.load(root / "iris" / "model.joblib")}
    WarmStarts(root / "home").stop_all()


def _context(home: Path, **env: str) -> Context:
    return build_context(load_settings(environ={"MODELCD_HOME": str(home), "MODELCD_TOKEN": "t" * 24,
                                                "MODELCD_ROUTER_PORT": str(free_port()), **env}))


@pytest.fixture
def ctx(shared: dict[str, Any]) -> Iterator[Context]:
    c = _context(shared["home"])
    yield c
    c.db.dispose()


def iris_rows(n: int, seed: int = 0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    frame = pd.DataFrame(rng.uniform(0.1, 8.0, size=(n, 4)).round(3), columns=COLUMNS)
    frame.insert(0, "id", np.arange(n) + 1000)
    return frame


def run(ctx: Context, input_uri: str, output_uri: str, *, model: str = "iris", fmt: str | None = None,
        keys: tuple[str, ...] = ("id",), max_errors: int | None = None, cancel: threading.Event | None = None,
        lines: list[str] | None = None, **kw: Any) -> BatchResult:
    log = lines.append if lines is not None else (lambda _line: None)
    return score_dataset(ctx, model=model, version=1, input_uri=input_uri, output_uri=output_uri, fmt=fmt,
                         keys=keys, max_errors=max_errors, log=log, cancel=cancel or threading.Event(), **kw)


def no_temporaries(folder: Path) -> None:
    assert not [p for p in folder.rglob("*") if is_temporary(p.name)]


def test_csv_of_100k_rows_equals_the_models_own_predictions(ctx: Context, shared: dict[str, Any],
                                                            tmp_path: Path) -> None:
    rows = iris_rows(100_000)
    rows.to_csv(tmp_path / "in.csv", index=False)
    lines: list[str] = []
    result = run(ctx, str(tmp_path / "in.csv"), str(tmp_path / "out" / "scored.csv"), lines=lines,
                 chunk_rows=30_000)
    assert (result.rows_read, result.rows_scored, result.errors) == (100_000, 100_000, 0)
    assert result.output == str(tmp_path / "out" / "scored.csv")
    out = pd.read_csv(tmp_path / "out" / "scored.csv")
    assert list(out.columns) == ["id", "prediction", "model_version"]
    assert out["id"].tolist() == rows["id"].tolist()
    expected = shared["model"].predict(rows[COLUMNS].to_numpy())
    assert (out["prediction"].to_numpy() == expected).all()
    assert set(out["model_version"]) == {1}
    assert any("rows read 100000, rows scored 100000" in line and "rows/s" in line for line in lines)
    no_temporaries(tmp_path)


def _worker(lines: list[str]) -> tuple[str, int]:
    """How the run's scoring worker started (warm or cold) and its pid, from the run's log."""
    found = [re.search(r"scoring worker started \((warm|cold), pid (\d+)", line) for line in lines]
    match = next(m for m in found if m)
    return match.group(1), int(match.group(2))


def test_the_worker_forks_from_the_warm_parent_and_scores_as_a_fresh_interpreter(
        ctx: Context, shared: dict[str, Any], tmp_path: Path) -> None:
    """With the environment's parent running, the worker is a fork of it; with warm starts off
    a fresh interpreter; both write the same bytes."""
    iris_rows(50_000).to_csv(tmp_path / "in.csv", index=False)
    parent = _parent(ctx)
    lines: list[str] = []
    parents: list[int] = []

    def log(line: str) -> None:
        lines.append(line)
        if "scoring worker started" in line:  # it runs while the run goes on
            parents.append(psutil.Process(_worker([line])[1]).ppid())

    score_dataset(ctx, model="iris", version=1, input_uri=str(tmp_path / "in.csv"),
                  output_uri=str(tmp_path / "warm.csv"), fmt=None, keys=["id"], max_errors=None, log=log,
                  cancel=threading.Event(), chunk_rows=7_000)
    assert _worker(lines)[0] == "warm" and parents == [parent["pid"]], (lines, parents, parent)
    cold_ctx = _context(shared["home"], MODELCD_WARM_STARTS="false")
    try:
        cold_lines: list[str] = []
        run(cold_ctx, str(tmp_path / "in.csv"), str(tmp_path / "cold.csv"), lines=cold_lines, chunk_rows=7_000)
    finally:
        cold_ctx.db.dispose()
    assert _worker(cold_lines)[0] == "cold" and not any("warm start unavailable" in line for line in cold_lines)
    assert (tmp_path / "warm.csv").read_bytes() == (tmp_path / "cold.csv").read_bytes()


@pytest.mark.parametrize("how", ["warm", "cold"])
def test_a_worker_killed_during_a_run_fails_it_with_its_exit_code(how: str, shared: dict[str, Any],
                                                                  tmp_path: Path) -> None:
    """Forked from the parent or a fresh interpreter, a worker that dies mid-run is reported
    with its exit status, and the run leaves no output."""
    iris_rows(100_000).to_csv(tmp_path / "in.csv", index=False)
    c = _context(shared["home"], **({"MODELCD_WARM_STARTS": "false"} if how == "cold" else {}))
    if how == "warm":
        _parent(c)
    killed: list[tuple[str, int]] = []

    def log(line: str) -> None:
        if "scoring worker started" in line:
            killed.append(_worker([line]))
            os.killpg(killed[0][1], signal.SIGKILL)

    try:
        with pytest.raises(BatchFailed, match=r"the scoring worker exited \(code -9\)"):
            score_dataset(c, model="iris", version=1, input_uri=str(tmp_path / "in.csv"),
                          output_uri=str(tmp_path / "out.csv"), fmt=None, keys=["id"], max_errors=None, log=log,
                          cancel=threading.Event(), chunk_rows=500)
    finally:
        c.db.dispose()
    assert [k[0] for k in killed] == [how] and not (tmp_path / "out.csv").exists()
    no_temporaries(tmp_path)


def _parent(ctx: Context) -> dict[str, Any]:
    """The hello of iris v1's environment's warm parent (started when none runs)."""
    v = ctx.registry.get_version("iris", 1)
    bundle = build_bundle(ctx.home, v, ctx.registry.materialize(v), lambda _: None, threading.Event())
    return ctx.target("process").warm.ensure(os.path.abspath(bundle.python), Path(bundle.path),
                                             inherited_env(os.environ))


def test_folder_of_parquet_files_into_json_lines_with_row_numbers(ctx: Context, shared: dict[str, Any],
                                                                  tmp_path: Path) -> None:
    rows = iris_rows(5_000, seed=1).drop(columns="id")
    (tmp_path / "in").mkdir()
    for i, start in enumerate(range(0, 5_000, 2_000)):
        rows.iloc[start:start + 2_000].to_parquet(tmp_path / "in" / f"part-{i}.parquet", index=False)
    (tmp_path / "in" / "_SUCCESS").write_text("")  # markers are skipped
    result = run(ctx, str(tmp_path / "in"), str(tmp_path / "out") + "/", fmt="jsonl", keys=())
    assert result.rows_scored == 5_000
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["part-00000.jsonl"]
    out = pd.read_json(tmp_path / "out" / "part-00000.jsonl", lines=True)
    assert out["row"].tolist() == list(range(5_000))
    expected = shared["model"].predict(rows[COLUMNS].to_numpy())
    assert (out["prediction"].to_numpy() == expected).all()
    # a rerun replaces the folder
    run(ctx, str(tmp_path / "in"), str(tmp_path / "out"), fmt="parquet", keys=())
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["part-00000.parquet"]
    no_temporaries(tmp_path)


def test_entry_script_model_scores_through_the_json_body(ctx: Context, tmp_path: Path) -> None:
    frame = pd.DataFrame({"key": ["a", "b", "c"], "x": [1.0, 2.0, 3.5], "y": [10, 20, 30]})
    frame.to_csv(tmp_path / "in.csv", index=False)
    result = run(ctx, str(tmp_path / "in.csv"), str(tmp_path / "out.parquet"), model="summer", keys=("key",))
    assert result.rows_scored == 3
    out = pd.read_parquet(tmp_path / "out.parquet")
    assert out["key"].tolist() == ["a", "b", "c"]
    assert out["prediction"].tolist() == [11.0, 22.0, 33.5]


def test_s3_prefix_of_several_files_into_another_prefix_and_a_rerun_replaces(
        shared: dict[str, Any], tmp_path: Path, moto_endpoint: str, aws_env: None,  # noqa: F811
        monkeypatch: pytest.MonkeyPatch) -> None:
    client = boto3.client("s3", endpoint_url=moto_endpoint, region_name="us-east-1")
    bucket = f"data-{uuid.uuid4().hex[:10]}"
    client.create_bucket(Bucket=bucket)
    rows = iris_rows(9_000, seed=2)
    for i in range(3):
        body = rows.iloc[i * 3_000:(i + 1) * 3_000].to_csv(index=False).encode()
        client.put_object(Bucket=bucket, Key=f"in/day={i}/rows.csv", Body=body)
    client.put_object(Bucket=bucket, Key="out/stale-from-before.csv", Body=b"id,prediction\n1,2\n")
    ctx = _context(shared["home"], MODELCD_S3_ENDPOINT_URL=moto_endpoint)
    monkeypatch.setattr(datasets, "PART_ROWS", 2_000)
    result = run(ctx, f"s3://{bucket}/in/", f"s3://{bucket}/out/")
    assert result.output == f"s3://{bucket}/out/"

    def listing() -> list[str]:
        return sorted(o["Key"] for o in client.list_objects_v2(Bucket=bucket).get("Contents", []))

    outs = [k for k in listing() if k.startswith("out/")]
    # a part holds whole chunks up to 2,000 rows or more (here one file's 3,000); the stale key is gone
    assert outs == [f"out/part-{i:05d}.csv" for i in range(3)]
    out = pd.concat(pd.read_csv(io.BytesIO(client.get_object(Bucket=bucket, Key=k)["Body"].read())) for k in outs)
    assert out["id"].tolist() == rows["id"].tolist()
    assert (out["prediction"].to_numpy() == shared["model"].predict(rows[COLUMNS].to_numpy())).all()
    assert all(k.startswith(("in/", "out/")) for k in listing())  # no staging prefix left
    monkeypatch.setattr(datasets, "PART_ROWS", 1_000_000)
    run(ctx, f"s3://{bucket}/in/", f"s3://{bucket}/out/")
    assert [k for k in listing() if k.startswith("out/")] == ["out/part-00000.csv"]
    assert all(k.startswith(("in/", "out/")) for k in listing())
    ctx.db.dispose()


def test_sqlite_table_into_another_table_through_a_connection(ctx: Context, shared: dict[str, Any], tmp_path: Path,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    db = tmp_path / "data.sqlite"
    engine = sqlalchemy.create_engine(f"sqlite:///{db}")
    rows = iris_rows(20_000, seed=3)
    rows.to_sql("flowers", engine, index=False)
    monkeypatch.setenv("FLOWERS_DB_URL", f"sqlite:///{db}")
    Connections(ctx.db).add("flowers", "FLOWERS_DB_URL")
    result = run(ctx, "sql://flowers/flowers", "sql://flowers/scored", chunk_rows=7_000)
    assert result.output == "sql://flowers/scored"
    out = pd.read_sql("SELECT * FROM scored", engine)
    assert list(out.columns) == ["id", "prediction", "model_version"]
    assert out["id"].tolist() == rows["id"].tolist()
    assert (out["prediction"].to_numpy() == shared["model"].predict(rows[COLUMNS].to_numpy())).all()
    # a query as input; the rerun replaces the table
    run(ctx, "sql://flowers?query=SELECT * FROM flowers WHERE id < 1100", "sql://flowers/scored")
    assert pd.read_sql("SELECT count(*) AS n FROM scored", engine)["n"][0] == 100
    tables = sqlalchemy.inspect(engine).get_table_names()
    assert sorted(tables) == ["flowers", "scored"]
    engine.dispose()


def bad_csv(path: Path) -> pd.DataFrame:
    rows = iris_rows(1_000, seed=4).astype({"sepal_width": object})
    rows.loc[10, "sepal_width"] = "abc"
    rows.loc[500, "petal_length"] = np.nan  # the model refuses NaN
    rows.loc[999, "sepal_width"] = "n/a?"
    rows.to_csv(path, index=False)
    return rows


def test_bad_rows_are_counted_with_their_reason_and_left_out(ctx: Context, shared: dict[str, Any],
                                                             tmp_path: Path) -> None:
    bad_csv(tmp_path / "in.csv")
    result = run(ctx, str(tmp_path / "in.csv"), str(tmp_path / "out.csv"), chunk_rows=256)
    assert (result.rows_read, result.rows_scored, result.errors) == (1_000, 997, 3)
    assert result.first_errors[0].startswith("row 10 (id=1010): column 'sepal_width': 'abc' is not a number")
    assert result.first_errors[1].startswith("row 500 (id=1500): ValueError:")
    assert "NaN" in result.first_errors[1]
    assert result.first_errors[2].startswith("row 999 (id=1999)")
    out = pd.read_csv(tmp_path / "out.csv")
    assert len(out) == 997 and not {1010, 1500, 1999} & set(out["id"])


def test_more_bad_rows_than_max_errors_fails_with_no_output(ctx: Context, tmp_path: Path) -> None:
    bad_csv(tmp_path / "in.csv")
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "part-00000.csv").write_text("old\n")
    with pytest.raises(BatchFailed) as failed:
        run(ctx, str(tmp_path / "in.csv"), str(tmp_path / "out"), max_errors=2)
    assert failed.value.field == "max_errors"
    assert "more than 2 row(s)" in failed.value.message
    assert "row 500 (id=1500): ValueError" in failed.value.message  # found by the worker past the limit
    assert (tmp_path / "out" / "part-00000.csv").read_text() == "old\n"  # the previous output stays
    with pytest.raises(BatchFailed):
        run(ctx, str(tmp_path / "in.csv"), str(tmp_path / "new.csv"), max_errors=0)
    assert not (tmp_path / "new.csv").exists()
    no_temporaries(tmp_path)
    assert run(ctx, str(tmp_path / "in.csv"), str(tmp_path / "new.csv"), max_errors=3).errors == 3


def test_stop_during_a_run_leaves_no_output(ctx: Context, tmp_path: Path) -> None:
    iris_rows(200_000).to_csv(tmp_path / "in.csv", index=False)
    cancel = threading.Event()
    lines: list[str] = []

    def log(line: str) -> None:
        lines.append(line)
        if "scoring worker started" in line:
            threading.Timer(0.2, cancel.set).start()

    with pytest.raises(Cancelled):
        score_dataset(ctx, model="iris", version=1, input_uri=str(tmp_path / "in.csv"),
                      output_uri=str(tmp_path / "out.csv"), fmt=None, keys=["id"], max_errors=None, log=log,
                      cancel=cancel, chunk_rows=500)
    assert not (tmp_path / "out.csv").exists()
    no_temporaries(tmp_path)
    no_temporaries(ctx.home / "tmp")


def test_bad_arguments_name_the_field(ctx: Context, tmp_path: Path) -> None:
    iris_rows(10).to_csv(tmp_path / "in.csv", index=False)
    (tmp_path / "in.txt").write_text("x\n")
    cases = [
        ({"input_uri": "ftp://host/x.csv"}, "input"),
        ({"input_uri": str(tmp_path / "missing.csv")}, "input"),
        ({"output_uri": "sql://nosuch/table"}, "output"),
        ({"input_uri": "sql://nosuch?query=SELECT 1"}, "input"),
        ({"output_uri": "sql://x/bad name"}, "output"),
        ({"keys": ["nope"]}, "keys"),
        ({"fmt": "xls"}, "format"),
        ({"input_uri": str(tmp_path / "in.txt")}, "format"),
        ({"max_errors": -1}, "max_errors"),
    ]
    for change, field in cases:
        args: dict[str, Any] = {"model": "iris", "version": 1, "input_uri": str(tmp_path / "in.csv"),
                                "output_uri": str(tmp_path / "out.csv"), "fmt": None, "keys": ["id"],
                                "max_errors": None, **change}
        with pytest.raises(InvalidInput) as bad:
            score_dataset(ctx, log=lambda _line: None, cancel=threading.Event(), **args)
        assert bad.value.field == field, (change, bad.value.message)
    assert not (tmp_path / "out.csv").exists()


def test_connection_url_is_read_from_the_variable_and_never_shown(ctx: Context,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    connections = Connections(ctx.db)
    doc = connections.add("warehouse", "WAREHOUSE_URL")
    assert doc == {"name": "warehouse", "url_env": "WAREHOUSE_URL", "url_set": False, "created_at": doc["created_at"]}
    with pytest.raises(InvalidInput, match=r"\$WAREHOUSE_URL, which is not set"):
        connections.url("warehouse", "input")
    monkeypatch.setenv("WAREHOUSE_URL", "postgresql://user:s3cret@db/x")
    assert connections.url("warehouse", "input") == "postgresql://user:s3cret@db/x"
    assert "s3cret" not in repr(connections.list())
    with pytest.raises(InvalidInput):
        connections.add("bad name", "X")
    with pytest.raises(InvalidInput):
        connections.add("other", "postgresql://user:pw@db/x")
    connections.remove("warehouse")
    assert "warehouse" not in [c["name"] for c in connections.list()]
