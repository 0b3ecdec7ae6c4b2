"""The scoring runtime: serves one model version over HTTP inside a bundle or an image.

It imports nothing from the rest of modelcd, only the standard library, its HTTP server
packages (``RUNTIME_REQUIREMENTS``) and the model's own libraries, because a builder copies
it (with ``modelcd/__init__.py``) into each bundle venv and scoring image. Start it with
``python -m modelcd.scoring --model-dir DIR --config FILE --host 127.0.0.1 --port PORT``.
"""

# The HTTP server stack, chosen by measurement (docs/benchmarks-scoring.md): gunicorn's arbiter
# supervises worker processes that run uvicorn's event loop with the httptools parser.
RUNTIME_REQUIREMENTS: list[str] = [
    "gunicorn>=23",
    "uvicorn>=0.30",
    "uvicorn-worker>=0.2",
    "httptools>=0.6",
]

__all__ = ["RUNTIME_REQUIREMENTS"]
