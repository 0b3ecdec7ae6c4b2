"""An uncompressed CSV file read in segments cut at line ends (values hold no newlines, as
arrow assumes by default) and parsed by threads ahead of the reader, yielded in file order.

The first segment is parsed alone and fixes the column types for the rest; then up to
``workers + 1`` segments are in flight, so memory stays bounded whatever the file's size.
Used by the training statistics (analysis.statistics) and batch scoring (batch.datasets),
each with its own ``parse`` (how a segment whose values do not fit the types is handled)."""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pandas as pd

# parse(raw segment, column types) -> (arrow schema, frame); a header-less segment
Parse = Callable[[bytes, dict[str, Any]], tuple[Any, pd.DataFrame]]


def csv_options(path: Path, delimiter: str) -> tuple[Any, Any]:
    """(read options, parse options) for the header-less segments of ``path``: the column
    names as arrow reads them from the header (quoted names and all)."""
    import pyarrow.csv as pc

    parse_options = pc.ParseOptions(delimiter=delimiter)
    with pc.open_csv(str(path), read_options=pc.ReadOptions(block_size=1 << 16), parse_options=parse_options) as head:
        names = head.schema.names
    return pc.ReadOptions(column_names=names, use_threads=False), parse_options


def parsed_segments(path: Path, parse: Parse, *, types: dict[str, Any], segment_bytes: int, workers: int,
                    thread_name: str) -> Iterator[pd.DataFrame]:
    """The frames of ``path``'s segments after its header: the first parsed with ``types``,
    the rest with the first's non-null column types (``types`` still winning)."""
    import pyarrow as pa

    with path.open("rb") as f:
        f.readline()  # the header

        def segment() -> bytes:
            raw = f.read(segment_bytes)
            return raw + f.readline() if raw else b""

        first = segment()
        if not first:
            return
        schema, frame = parse(first, dict(types))
        fixed = {field.name: field.type for field in schema if not pa.types.is_null(field.type)} | types
        yield frame
        del frame
        with ThreadPoolExecutor(workers, thread_name_prefix=thread_name) as pool:
            pending: deque[Future[tuple[Any, pd.DataFrame]]] = deque()
            try:
                while raw := segment():
                    pending.append(pool.submit(parse, raw, fixed))
                    del raw
                    if len(pending) > workers:
                        yield pending.popleft().result()[1]
                while pending:
                    yield pending.popleft().result()[1]
            finally:
                for future in pending:
                    future.cancel()
