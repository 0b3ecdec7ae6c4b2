"""Build stage: turn a model version into something a target can run (a bundle for the
``process`` target)."""

from modelcd.build.bundle import build_bundle

__all__ = ["build_bundle"]
