"""Tests of the webhook source adapters (modelcd.sources)."""
