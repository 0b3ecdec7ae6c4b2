"""Release pipelines as code: render GitHub Actions / Azure Pipelines files from
``pipeline_templates/``, validate them, commit them to the model's repository, start runs
through the CI system's API and track them (see docs/architecture.md)."""
