"""Analysis of a deployment under release: the smoke and canary assessments (plain functions
with four outcomes, the worst wins) and the thin I/O that measures what they judge."""
