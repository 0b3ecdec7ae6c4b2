"""Bring an older database up to the current tables: columns added since it was made are
added (all of them nullable, so existing rows stay valid), and so are indexes added since. Tables
themselves are created by ``metadata.create_all``; nothing is ever dropped or renamed here."""

from __future__ import annotations

from sqlalchemy import Engine, inspect
from sqlalchemy.schema import CreateColumn

from modelcd.store import schema


def add_missing_columns(engine: Engine) -> list[str]:
    """Add every column of ``schema.metadata`` that an existing table lacks; return them as
    ``table.column``. A new column must be nullable (or have a server default) to be added."""
    inspector = inspect(engine)
    added: list[str] = []
    with engine.begin() as conn:
        for table in schema.metadata.sorted_tables:
            if not inspector.has_table(table.name):
                continue
            have = {c["name"] for c in inspector.get_columns(table.name)}
            for column in table.columns:
                if column.name in have:
                    continue
                ddl = CreateColumn(column).compile(dialect=engine.dialect)
                conn.exec_driver_sql(f'ALTER TABLE "{table.name}" ADD COLUMN {ddl}')
                added.append(f"{table.name}.{column.name}")
            indexes = {i["name"] for i in inspector.get_indexes(table.name)}
            for index in table.indexes:
                if index.name not in indexes:
                    index.create(conn)
                    added.append(f"{table.name}.{index.name}")
    return added
