"""Fixtures shared with the scoring tests: real scoring services to read metrics from."""

from tests.scoring.conftest import iris, start_server  # noqa: F401 (fixtures)
