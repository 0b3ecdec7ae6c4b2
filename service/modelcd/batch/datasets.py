"""Datasets of batch scoring: where rows come from and where predictions go.

URIs:

- a local path: a file, or a folder of many files (read in name order; names starting with
  ``.`` or ``_`` skipped); an output path with a suffix (``.csv``, ``.parquet``, ``.jsonl``)
  is one file, any other is a folder of ``part-00000.<fmt>`` files;
- ``s3://bucket/prefix/``: every object under the prefix (same skips), with the S3 client
  settings of the artifact store (``s3_endpoint_url``, ``s3_region``, boto3's credentials);
- ``sql://CONNECTION/TABLE`` (input or output) or ``sql://CONNECTION?query=SELECT...``
  (input) through a named connection: the SQLAlchemy URL is read from the environment
  variable the connection names, never stored or shown.

Formats: CSV, Parquet and JSON lines, from ``fmt`` or each file's suffix. Readers yield
DataFrames of at most ``chunk_rows`` rows; memory is bounded by the chunks in flight.

Writers never write where readers look until the end: rows go to a spool (local files in a
locked temporary beside a local output, or in the home's scratch space), and ``commit``
moves them into place at once: a rename (local), a copy from a temporary prefix then removal
of the previous run's other keys (S3), a table renamed in one transaction (SQL). A run that
fails or is stopped only removes its spool.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import urllib.parse
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
from sqlalchemy import delete, insert, select

from modelcd.csv_segments import csv_options, parsed_segments
from modelcd.errors import BatchFailed, Conflict, InvalidInput, NotFound
from modelcd.fsutil import is_temporary, scratch_dir, temp_name
from modelcd.store import schema
from modelcd.store.db import Database, now

FORMATS = ("csv", "parquet", "jsonl")
SUFFIXES = {".csv": "csv", ".tsv": "csv", ".parquet": "parquet", ".pq": "parquet", ".jsonl": "jsonl",
            ".ndjson": "jsonl", ".json": "jsonl"}
CHUNK_ROWS = 65_536
CSV_SEGMENT_BYTES = 4 * 1024 * 1024
CSV_WORKERS = 1  # one parse thread ahead of the scoring: as fast here, 15-25 MB less at peak
PART_ROWS = 1_000_000  # rows per output part of a folder or S3 prefix
_CONNECTION_NAME = re.compile(r"^[A-Za-z][A-Za-z0-9_-]{0,63}$")
_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,127}$")
_TABLE_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,62}(\.[A-Za-z_][A-Za-z0-9_]{0,62})?$")
_CSV_COLUMN_ERROR = re.compile(r"In CSV column #(\d+): (?:Row #\d+: )?CSV conversion error")


@dataclass(frozen=True)
class Location:
    """A parsed dataset URI."""

    kind: str  # file | s3 | sql
    uri: str
    path: Path | None = None
    bucket: str = ""
    prefix: str = ""
    connection: str = ""
    table: str = ""
    query: str = ""


def parse_uri(uri: str, field: str) -> Location:
    """A dataset URI as a ``Location``; InvalidInput naming ``field`` when it is not one."""
    if not isinstance(uri, str) or not uri.strip():
        raise InvalidInput(f"{field}: give a local path, s3://bucket/prefix/ or sql://CONNECTION/TABLE", field=field)
    uri = uri.strip()
    parts = urllib.parse.urlsplit(uri)
    if parts.scheme == "s3":
        if not parts.netloc:
            raise InvalidInput(f"{field}: {uri!r} names no bucket; use s3://bucket/prefix/", field=field)
        return Location("s3", uri, bucket=parts.netloc, prefix=parts.path.lstrip("/"))
    if parts.scheme == "sql":
        name = parts.netloc
        if not _CONNECTION_NAME.match(name or ""):
            raise InvalidInput(f"{field}: {uri!r} names no connection; use sql://CONNECTION/TABLE (connections: "
                               "`modelcd connections list`)", field=field)
        table = parts.path.strip("/")
        query = urllib.parse.parse_qs(parts.query).get("query", [""])[0].strip()
        if query and table:
            raise InvalidInput(f"{field}: give a table or ?query=, not both", field=field)
        if query and field == "output":
            raise InvalidInput("output: a query cannot be written to; use sql://CONNECTION/TABLE", field=field)
        if not query and not _TABLE_NAME.match(table):
            raise InvalidInput(f"{field}: {table!r} is not a table name (letters, digits, '_'; optionally "
                               "schema.table)", field=field)
        return Location("sql", uri, connection=name, table=table, query=query)
    if parts.scheme in ("", "file"):
        path = Path(parts.path if parts.scheme == "file" else uri).expanduser()
        return Location("file", uri, path=path.absolute())
    raise InvalidInput(f"{field}: scheme {parts.scheme!r} is not supported; use a local path, s3:// or sql://",
                       field=field)


def check_format(fmt: str | None) -> None:
    if fmt is not None and fmt not in FORMATS:
        raise InvalidInput(f"format {fmt!r} is not one of {', '.join(FORMATS)}", field="format")


def format_of(fmt: str | None, name: str, field: str = "format") -> str:
    """The format ``name``'s suffix names (``.gz`` etc. skipped), else ``fmt``; InvalidInput
    (field ``format``) when neither tells."""
    check_format(fmt)
    suffixes = [s.lower() for s in Path(name).suffixes if s.lower() not in (".gz", ".bz2", ".zst")]
    found = SUFFIXES.get(suffixes[-1]) if suffixes else None
    if found is not None:
        return found
    if fmt:
        return fmt
    raise InvalidInput(f"{field}: cannot tell the format of {name!r} from its name; pass --format "
                       f"({', '.join(FORMATS)})", field="format")


def _skipped(name: str) -> bool:
    return name.startswith((".", "_")) or is_temporary(name)


# -- connections -------------------------------------------------------------------------------


class Connections:
    """Named SQL connections: the name and the name of the environment variable holding the
    SQLAlchemy URL (credentials by reference; the URL is never stored, logged or answered)."""

    def __init__(self, db: Database) -> None:
        self.db = db

    def add(self, name: str, url_env: str) -> dict[str, Any]:
        if not isinstance(name, str) or not _CONNECTION_NAME.match(name):
            raise InvalidInput(f"connection name {name!r}: letters, digits, '_' and '-', starting with a letter",
                               field="name")
        if not isinstance(url_env, str) or not _ENV_NAME.match(url_env):
            raise InvalidInput("url_env must be the name of an environment variable (letters, digits, '_'), not "
                               "the URL; the value given is not shown: it may hold a password", field="url_env")
        row = {"name": name, "url_env": url_env, "created_at": now()}
        with self.db.write() as conn:
            if conn.execute(select(schema.connections.c.name).where(schema.connections.c.name == name)).first():
                raise Conflict(f"connection {name!r} exists; remove it first", field="name")
            conn.execute(insert(schema.connections).values(**row))
        return self._doc(row)

    def list(self) -> list[dict[str, Any]]:
        with self.db.read() as conn:
            rows = conn.execute(select(schema.connections).order_by(schema.connections.c.name)).mappings().all()
        return [self._doc(dict(r)) for r in rows]

    def get(self, name: str) -> dict[str, Any]:
        with self.db.read() as conn:
            row = conn.execute(select(schema.connections).where(schema.connections.c.name == name)).mappings().first()
        if row is None:
            raise NotFound(f"no connection {name!r}; add it with `modelcd connections add {name} --url-env VAR`",
                           field="connection")
        return self._doc(dict(row))

    def remove(self, name: str) -> None:
        with self.db.write() as conn:
            done = conn.execute(delete(schema.connections).where(schema.connections.c.name == name)).rowcount
        if not done:
            raise NotFound(f"no connection {name!r}", field="name")

    def url(self, name: str, field: str) -> str:
        """The SQLAlchemy URL of connection ``name`` from its variable; InvalidInput naming
        ``field`` for an unknown connection or an unset variable."""
        try:
            conn = self.get(name)
        except NotFound as e:
            raise InvalidInput(f"{field}: {e.message}", field=field) from None
        value = os.environ.get(conn["url_env"], "")
        if not value:
            raise InvalidInput(f"{field}: connection {name!r} reads its URL from ${conn['url_env']}, which is not set "
                               "in the service's environment", field=field)
        return value

    @staticmethod
    def _doc(row: dict[str, Any]) -> dict[str, Any]:
        env = row["url_env"]
        return {"name": row["name"], "url_env": env, "url_set": bool(os.environ.get(env)),
                "created_at": row["created_at"]}


def sql_engine(url: str, field: str) -> Any:
    import sqlalchemy

    try:
        return sqlalchemy.create_engine(url)
    except Exception as e:  # the URL itself is never shown: it may hold a password
        raise InvalidInput(f"{field}: the connection's URL is not a SQLAlchemy URL ({type(e).__name__})",
                           field=field) from None


# -- S3 ------------------------------------------------------------------------------------------


def s3_client(settings: Any) -> Any:
    """A boto3 S3 client with the service's S3 settings (path style for a custom endpoint)."""
    import boto3
    from botocore.config import Config

    endpoint = settings.s3_endpoint_url
    config = Config(retries={"max_attempts": 3, "mode": "standard"}, connect_timeout=5, read_timeout=60,
                    s3={"addressing_style": "path"} if endpoint else None)
    return boto3.session.Session().client("s3", endpoint_url=endpoint, region_name=settings.s3_region,
                                          config=config)


def s3_keys(client: Any, bucket: str, prefix: str) -> list[str]:
    """Every key under ``prefix`` (temporaries and ``.``/``_`` names skipped), sorted; only
    ``prefix`` itself when it names one object (``s3://bucket/data/iris.csv``)."""
    keys: list[str] = []
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
        for item in page.get("Contents", []):
            key = item["Key"]
            if key == prefix and prefix and not prefix.endswith("/"):
                return [key]
            rest = key[len(prefix):].lstrip("/")
            if not rest or key.endswith("/") or any(_skipped(p) for p in rest.split("/")):
                continue
            keys.append(key)
    return sorted(keys)


# -- reading -------------------------------------------------------------------------------------


class Source:
    """The rows of an input URI, as DataFrames of at most ``chunk_rows`` rows."""

    def __init__(self, loc: Location, fmt: str | None, *, scratch: Path, settings: Any, connections: Connections,
                 chunk_rows: int = CHUNK_ROWS) -> None:
        self.loc = loc
        self.fmt = fmt
        self.scratch = scratch
        self.settings = settings
        self.connections = connections
        self.chunk_rows = chunk_rows
        self.url = connections.url(loc.connection, "input") if loc.kind == "sql" else ""
        self.files: list[Path] = []
        self.keys: list[str] = []
        if loc.kind == "file":
            self.files = self._local_files()
        elif loc.kind == "s3":
            self.keys = self._s3_keys()

    @property
    def format(self) -> str | None:
        """The format of the first input file (the output's default)."""
        if self.files:
            return format_of(self.fmt, self.files[0].name, "input")
        if self.keys:
            return format_of(self.fmt, self.keys[0], "input")
        return self.fmt

    def _s3_keys(self) -> list[str]:
        try:
            keys = s3_keys(s3_client(self.settings), self.loc.bucket, self.loc.prefix)
        except Exception as e:
            raise BatchFailed(f"input: cannot list {self.loc.uri}: {_short(e)}", field="input") from e
        if not keys:
            raise InvalidInput(f"input: {self.loc.uri} holds no objects", field="input")
        for key in keys:
            format_of(self.fmt, key, "input")
        return keys

    def _local_files(self) -> list[Path]:
        path = self.loc.path
        assert path is not None
        if path.is_file():
            format_of(self.fmt, path.name, "input")
            return [path]
        if path.is_dir():
            files = sorted(p for p in path.rglob("*") if p.is_file()
                           and not any(_skipped(part) for part in p.relative_to(path).parts))
            if not files:
                raise InvalidInput(f"input: folder {path} holds no files", field="input")
            for f in files:
                format_of(self.fmt, f.name, "input")
            return files
        raise InvalidInput(f"input: {path} does not exist", field="input")

    def chunks(self) -> Iterator[pd.DataFrame]:
        """Every row, in order, re-chunked to at most ``chunk_rows``."""
        for frame in self._frames():
            for start in range(0, len(frame), self.chunk_rows):
                yield frame.iloc[start:start + self.chunk_rows]

    def _frames(self) -> Iterator[pd.DataFrame]:
        if self.loc.kind == "file":
            for path in self.files:
                yield from read_file(path, format_of(self.fmt, path.name, "input"), self.chunk_rows)
        elif self.loc.kind == "s3":
            yield from self._s3_frames()
        else:
            yield from self._sql_frames()

    def _s3_frames(self) -> Iterator[pd.DataFrame]:
        client = s3_client(self.settings)
        for key in self.keys:
            local = self.scratch / temp_name("in-" + Path(key).name)
            try:
                client.download_file(self.loc.bucket, key, str(local))
            except Exception as e:
                raise BatchFailed(f"input: cannot read s3://{self.loc.bucket}/{key}: {_short(e)}", field="input") from e
            try:
                yield from read_file(local, format_of(self.fmt, key, "input"), self.chunk_rows, shown=key)
            finally:
                local.unlink(missing_ok=True)

    def _sql_frames(self) -> Iterator[pd.DataFrame]:
        import sqlalchemy

        engine = sql_engine(self.url, "input")
        try:
            with engine.connect() as conn:
                if self.loc.query:
                    statement: Any = sqlalchemy.text(self.loc.query)
                else:
                    schema_name, _, name = self.loc.table.rpartition(".")
                    table = sqlalchemy.Table(name, sqlalchemy.MetaData(), schema=schema_name or None,
                                             autoload_with=conn)
                    statement = sqlalchemy.select(table)
                try:
                    frames = pd.read_sql(statement, conn, chunksize=self.chunk_rows)
                    yield from frames
                except sqlalchemy.exc.SQLAlchemyError as e:
                    raise BatchFailed(f"input: cannot read {self.loc.uri}: {_short(e)}", field="input") from e
        except sqlalchemy.exc.NoSuchTableError:
            raise InvalidInput(f"input: connection {self.loc.connection!r} has no table {self.loc.table!r}",
                               field="input") from None
        except sqlalchemy.exc.SQLAlchemyError as e:
            raise BatchFailed(f"input: cannot read {self.loc.uri}: {_short(e)}", field="input") from e
        finally:
            engine.dispose()


def read_file(path: Path, fmt: str, chunk_rows: int = CHUNK_ROWS, *, shown: str | None = None,
              segment_bytes: int = CSV_SEGMENT_BYTES) -> Iterator[pd.DataFrame]:
    """The rows of one CSV / Parquet / JSON lines file as DataFrames. BatchFailed naming the
    file when it cannot be read."""
    import pyarrow as pa

    shown = shown or str(path)
    try:
        if fmt == "parquet":
            import pyarrow.parquet as pq

            with pq.ParquetFile(path) as pf:
                for batch in pf.iter_batches(batch_size=chunk_rows):
                    yield batch.to_pandas()
        elif fmt == "csv" and not {".gz", ".bz2", ".zst"}.intersection(s.lower() for s in path.suffixes):
            yield from _csv_segments(path, "\t" if path.suffix.lower() == ".tsv" else ",", segment_bytes)
        else:
            if fmt == "jsonl":
                import pyarrow.json as pj

                reader = pj.open_json(pa.input_stream(str(path), compression="detect"),
                                      read_options=pj.ReadOptions(block_size=1 << 20))
            else:
                import pyarrow.csv as pc

                reader = pc.open_csv(pa.input_stream(str(path), compression="detect"),
                                     read_options=pc.ReadOptions(block_size=1 << 20),
                                     convert_options=pc.ConvertOptions(strings_can_be_null=True))
            with reader:
                for batch in reader:
                    yield batch.to_pandas()
    except (pa.ArrowException, OSError, ValueError) as e:
        raise BatchFailed(f"input: cannot read {shown} as {fmt.upper()}: {_short(e)}", field="input") from e


def _csv_segments(path: Path, delimiter: str, segment_bytes: int) -> Iterator[pd.DataFrame]:
    """An uncompressed CSV in segments cut at line ends, parsed on a thread ahead of the scoring, in file order.
    Column types come from the first segment; a segment where a column holds other values is
    parsed again with that column as text (the scoring turns text into numbers where the model
    needs them, counting the rows that are not)."""
    import pyarrow as pa
    import pyarrow.csv as pc

    read_options, parse_options = csv_options(path, delimiter)
    names = read_options.column_names

    def parse(raw: bytes, types: dict[str, Any]) -> tuple[Any, pd.DataFrame]:
        types = dict(types)
        for _ in range(len(names) + 1):
            try:
                table = pc.read_csv(pa.BufferReader(raw), read_options=read_options, parse_options=parse_options,
                                    convert_options=pc.ConvertOptions(strings_can_be_null=True, column_types=types))
                return table.schema, table.to_pandas()
            except pa.ArrowInvalid as e:
                match = _CSV_COLUMN_ERROR.search(str(e))
                if match is None or int(match.group(1)) >= len(names):
                    raise
                column = names[int(match.group(1))]
                if types.get(column) == pa.string():
                    raise
                types[column] = pa.string()
        raise ValueError("column types keep changing")

    yield from parsed_segments(path, parse, types={}, segment_bytes=segment_bytes, workers=CSV_WORKERS,
                               thread_name="batch-csv")


# -- writing -------------------------------------------------------------------------------------


class Spool:
    """Output rows written to local part files in ``folder`` (``fmt``), to be committed."""

    def __init__(self, folder: Path, fmt: str, part_rows: int | None) -> None:
        self.folder = folder
        self.fmt = fmt
        self.part_rows = part_rows
        self.parts: list[Path] = []
        self.rows = 0
        self._writer: Any = None
        self._part_rows = 0
        self._schema: Any = None
        self._file: Any = None

    def write(self, frame: pd.DataFrame) -> None:
        import pyarrow as pa

        if not len(frame):
            return
        table = pa.Table.from_pandas(frame, preserve_index=False)
        if self._schema is None:
            self._schema = table.schema
        elif table.schema != self._schema:
            try:
                table = table.cast(self._schema)
            except (pa.ArrowInvalid, pa.ArrowNotImplementedError, ValueError) as e:
                raise BatchFailed(f"output: a chunk's columns differ in type from the first chunk's ({_short(e)})",
                                  field="output") from e
        if self._writer is None or (self.part_rows and self._part_rows >= self.part_rows):
            self._open()
        if self.fmt == "jsonl":
            self._file.write(frame.to_json(orient="records", lines=True, date_format="iso").encode())
        else:
            self._writer.write_table(table)
        self._part_rows += len(frame)
        self.rows += len(frame)

    def _open(self) -> None:
        self.close()
        path = self.folder / f"part-{len(self.parts):05d}.{self.fmt}"
        self.parts.append(path)
        self._part_rows = 0
        if self.fmt == "csv":
            import pyarrow.csv as pc

            self._writer = pc.CSVWriter(str(path), self._schema)
        elif self.fmt == "parquet":
            import pyarrow.parquet as pq

            self._writer = pq.ParquetWriter(str(path), self._schema)
        else:
            self._file = path.open("wb")
            self._writer = self._file

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None
            self._file = None


class Sink:
    """Where a run's output goes: ``open`` a spool, ``commit`` it into place at the end."""

    def __init__(self, loc: Location, fmt: str | None, *, settings: Any, connections: Connections,
                 home: Path) -> None:
        self.loc = loc
        self.settings = settings
        self.home = home
        self.url = connections.url(loc.connection, "output") if loc.kind == "sql" else ""
        self.single = False
        self.fmt = fmt or "csv"
        self._given = fmt
        check_format(fmt)
        if loc.kind == "file":
            assert loc.path is not None
            self.single = loc.path.suffix.lower() in SUFFIXES and not loc.uri.endswith("/") and not loc.path.is_dir()
            if self.single:
                self.fmt = format_of(fmt, loc.path.name, "output")
        elif loc.kind == "sql":
            self.fmt = "parquet"  # the spool of a table keeps the column types

    def default_format(self, fmt: str | None) -> None:
        """A folder or prefix without --format gets the input's format."""
        if fmt and not self.single and self.loc.kind != "sql" and self._given is None:
            self.fmt = fmt

    @contextlib.contextmanager
    def spool(self) -> Iterator[Spool]:
        """A spool in a locked temporary (beside a local output, so the commit is a rename);
        removed on leaving, whatever happened."""
        if self.loc.kind == "file":
            assert self.loc.path is not None
            parent = self.loc.path.parent
            try:
                parent.mkdir(parents=True, exist_ok=True)
            except OSError as e:
                raise InvalidInput(f"output: cannot create {parent}: {e.strerror}", field="output") from None
        else:
            parent = self.home / "tmp"
        with scratch_dir(parent, "batch-out") as folder:
            spool = Spool(folder, self.fmt, None if self.single else PART_ROWS)
            try:
                yield spool
            finally:
                spool.close()

    def commit(self, spool: Spool, log: Callable[[str], None]) -> str:
        """Move the spool's rows where readers look; return where."""
        spool.close()
        if self.loc.kind == "file":
            return self._commit_local(spool)
        if self.loc.kind == "s3":
            return self._commit_s3(spool, log)
        return self._commit_sql(spool, log)

    def _commit_local(self, spool: Spool) -> str:
        final = self.loc.path
        assert final is not None
        if self.single:
            if not spool.parts:  # no rows scored: an empty file
                spool.parts.append(spool.folder / "empty")
                spool.parts[0].touch()
            os.replace(spool.parts[0], final)
            return str(final)
        tree = spool.folder / "tree"
        tree.mkdir()
        for part in spool.parts:
            os.replace(part, tree / part.name)
        if final.exists():
            if not final.is_dir():
                raise BatchFailed(f"output: {final} is a file; give a folder path or a file name with a suffix",
                                  field="output")
            old = spool.folder / "old"
            os.rename(final, old)
            os.rename(tree, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tree, final)
        return str(final)

    def _commit_s3(self, spool: Spool, log: Callable[[str], None]) -> str:
        client = s3_client(self.settings)
        bucket = self.loc.bucket
        prefix = self.loc.prefix if not self.loc.prefix or self.loc.prefix.endswith("/") else self.loc.prefix + "/"
        head, _, last = prefix.rstrip("/").rpartition("/")
        staging = (f"{head}/" if head else "") + temp_name(last or "output") + "/"
        try:
            for part in spool.parts:
                client.upload_file(str(part), bucket, staging + part.name)
            log(f"uploaded {len(spool.parts)} part(s) to s3://{bucket}/{staging}")
            old = set(s3_keys(client, bucket, prefix))
            new = [prefix + part.name for part in spool.parts]
            for part in spool.parts:
                client.copy({"Bucket": bucket, "Key": staging + part.name}, bucket, prefix + part.name)
            stale = sorted(old - set(new))
            for i in range(0, len(stale), 1000):
                client.delete_objects(Bucket=bucket, Delete={"Objects": [{"Key": k} for k in stale[i:i + 1000]]})
        except Exception as e:
            raise BatchFailed(f"output: cannot write s3://{bucket}/{prefix}: {_short(e)}", field="output") from e
        finally:
            with contextlib.suppress(Exception):
                staged = [{"Key": staging + p.name} for p in spool.parts]
                if staged:
                    client.delete_objects(Bucket=bucket, Delete={"Objects": staged})
        return f"s3://{bucket}/{prefix}"

    def _commit_sql(self, spool: Spool, log: Callable[[str], None]) -> str:
        import pyarrow.parquet as pq
        import sqlalchemy

        schema_name, _, name = self.loc.table.rpartition(".")
        temp = f"modelcd_tmp_{os.urandom(4).hex()}_{name}"[:63]
        engine = sql_engine(self.url, "output")
        prep = engine.dialect.identifier_preparer
        qualified = (prep.quote_schema(schema_name) + "." if schema_name else "")
        try:
            with engine.begin() as conn:
                first = True
                for part in spool.parts:
                    with pq.ParquetFile(part) as pf:
                        for batch in pf.iter_batches(batch_size=CHUNK_ROWS):
                            batch.to_pandas().to_sql(temp, conn, schema=schema_name or None, index=False,
                                                     if_exists="replace" if first else "append", chunksize=10_000)
                            first = False
                if first:
                    raise BatchFailed("output: no rows were scored; the table is left as it was", field="output")
                conn.execute(sqlalchemy.text(f"DROP TABLE IF EXISTS {qualified}{prep.quote(name)}"))
                conn.execute(sqlalchemy.text(f"ALTER TABLE {qualified}{prep.quote(temp)} RENAME TO {prep.quote(name)}"))
            log(f"table {self.loc.table} replaced")
        except sqlalchemy.exc.SQLAlchemyError as e:
            raise BatchFailed(f"output: cannot write {self.loc.uri}: {_short(e)}", field="output") from e
        finally:
            engine.dispose()
        return self.loc.uri


def _short(e: BaseException, limit: int = 300) -> str:
    text = " ".join(str(e).split()) or type(e).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


__all__ = ["FORMATS", "Connections", "Location", "Sink", "Source", "Spool", "format_of", "parse_uri", "read_file"]
