"""The ``prune_images`` job (``modelcd images prune``): the scoring images of versions nothing
needs any more leave the Docker engine, so disk use does not grow with every version.

A version's image stays while the version has a deployment that is not stopped (serving, kept
warm, being started or smoke-tested, asleep), while an endpoint's traffic, previous traffic (what
a rollback returns to) or shadow copies name one of its deployments, and while a release of it
is queued or under way. The rest go (``builders.prune``: only this control plane's versions,
by tag, never forced), then the dependencies images no image left was built on (none while a
release of this control plane is pending: its build may be about to use one). A version
released again later is built again (its wheels and layers are cached, so in seconds). With
``dry_run`` the job says what would go and removes nothing.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import TYPE_CHECKING

from sqlalchemy import select

from modelcd.builders.image import ImageOptions
from modelcd.builders.prune import Version, our_dependency_keys, plan_prune, remove_tags
from modelcd.docker_engine import connect
from modelcd.domain import DeploymentState, JobType
from modelcd.errors import DeployError
from modelcd.releases.machine import Phase
from modelcd.store import schema

if TYPE_CHECKING:
    from modelcd.context import Context
    from modelcd.jobs.service import Job

PENDING = [str(p) for p in Phase if p.active] + [str(Phase.QUEUED)]  # releases that may still deploy
DONE = (str(DeploymentState.STOPPED), str(DeploymentState.FAILED))


def needed_versions(ctx: Context) -> tuple[dict[Version, str], str | None]:
    """The versions whose images must stay, each with why; and why the dependencies images all
    stay (a release is pending: its build may use one no image is built on yet), or None."""
    keep: dict[Version, str] = {}
    d, e, r = schema.deployments.c, schema.endpoints.c, schema.releases.c
    with ctx.db.read() as conn:
        deployments = {row.id: row for row in conn.execute(select(d.id, d.model, d.version, d.state, d.environment))}
        endpoints = list(conn.execute(select(e.model, e.environment, e.traffic, e.previous_traffic, e.mirror)))
        releases = list(conn.execute(select(r.id, r.model, r.version, r.phase).where(r.phase.in_(PENDING))))
    for row in deployments.values():
        if row.state not in DONE:
            keep.setdefault((row.model, row.version), f"deployment {row.id} is {row.state} in {row.environment}")
    for row in endpoints:
        named = [("serves", row.traffic or {}), ("is what a rollback returns to", row.previous_traffic or {}),
                 ("gets its shadow copies", {row.mirror: 1} if row.mirror else {})]
        for what, traffic in named:
            for dep_id in traffic:
                if (dep := deployments.get(dep_id)) is not None:
                    keep.setdefault((dep.model, dep.version), f"{what} on {row.model}/{row.environment}")
    for row in releases:
        keep.setdefault((row.model, row.version), f"release {row.id} is {row.phase}")
    first = releases[0] if releases else None
    return keep, (f"release {first.id} ({first.model} v{first.version}) is {first.phase}: its build may use it"
                  if first is not None else None)


def prune_images(ctx: Context, dry_run: bool = False, by: str | None = None) -> Job:
    """Run the job to its end in this thread (see the module); the finished job."""
    job = ctx.jobs.create(JobType.PRUNE_IMAGES, actor=by)

    def body(job: Job, log: Callable[[str], None], cancel: threading.Event) -> str:
        options = ImageOptions.from_settings(ctx.settings)
        v = schema.versions.c
        client = connect(options.docker_host, DeployError)
        try:  # what the store needs is read right before the engine is looked at and the tags removed
            with ctx.db.read() as conn:
                recorded = {(row.model, row.version): row.digest
                            for row in conn.execute(select(v.model, v.version, v.digest))}
            keep, pending = needed_versions(ctx)
            ours = our_dependency_keys(client, ctx.home)
            plan = plan_prune(client, options.repository, recorded, keep, ours, pending, options.registry)
            for tag, why in plan.keep:
                log(f"keeping {tag}: {why}")
            size = f"{plan.bytes / 1e6:.0f} MB"
            if dry_run:
                for tag, why in plan.remove:
                    log(f"would remove {tag}: {why}")
                summary = (f"dry run: {len(plan.remove)} image tag(s) would go (about {size}), "
                           f"{len(plan.keep)} stay; nothing removed")
            else:
                removed, refused = remove_tags(client, plan.remove, log)
                said = f"; {len(refused)} kept by the engine (in use)" if refused else ""
                summary = f"removed {removed} image tag(s) (about {size}), {len(plan.keep)} kept{said}"
        finally:
            client.close()
        log(summary)
        return summary

    repository = ctx.settings.docker_repository
    ctx.jobs.run_to_end(job.id, f"{'dry run: ' if dry_run else ''}pruning the scoring images of {repository}/*",
                        body, "pruning images")
    return ctx.jobs.get(job.id)


def fail_interrupted(ctx: Context, echo: Callable[[str], None] | None = None) -> list[str]:
    """At start: prune jobs a dead process left open end (failed when running); what they removed
    is gone, what they had not is still there. Returns their ids."""
    return ctx.jobs.end_interrupted(JobType.PRUNE_IMAGES, "interrupted by a restart of the service; the images "
                                    "it had not removed yet are still there: `modelcd images prune` again", echo,
                                    of_releases=False)

