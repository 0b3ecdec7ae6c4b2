"""Which scoring images on the engine can go, and removing them (``modelcd images prune``).

A version's image is ``{repository}/{model}:{version}-{digest12}`` with modelcd's labels
(``builders.image``); the dependencies image of a lock is ``{repository}-deps:{abi}-{key}``
(``builders.image_deps``). ``plan_prune`` looks only at those two repositories and, among the
version images, only at the versions this control plane recorded (same model, version and
digest: another modelcd sharing the engine and repository keeps its own); it removes a version's
image unless ``keep`` names the version, and a dependencies image only when no image left on
the engine was built on it (its layers are the start of another image's). Removal is by tag,
never forced: an image a container still uses stays (said so).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from modelcd.builders.image import LABEL_PREFIX

Version = tuple[str, int]  # (model, version number)


@dataclass
class PrunePlan:
    """What goes (tags with the version, or None for a dependencies image) and what stays, why."""

    remove: list[tuple[str, str]] = field(default_factory=list)  # (tag, why it goes)
    keep: list[tuple[str, str]] = field(default_factory=list)  # (tag, why it stays)
    bytes: int = 0  # the sizes of the images that go (shared layers counted in each)


def _layers(image: Any) -> list[str]:
    return list((image.attrs.get("RootFS") or {}).get("Layers") or [])


def plan_prune(client: Any, repository: str, recorded: dict[Version, str], keep: dict[Version, str],
               keep_dependencies: str | None = None) -> PrunePlan:
    """``recorded``: every version of this control plane with its digest; ``keep``: the versions
    whose images must stay, each with the reason; ``keep_dependencies``: why every dependencies
    image stays (a build may be about to use one no image is built on yet), or None."""
    plan = PrunePlan()
    images = client.images.list()
    staying: list[Any] = []
    deps: list[tuple[Any, list[str]]] = []
    for image in images:
        tags = [t for t in image.tags if t.startswith(f"{repository}/")]
        dep_tags = [t for t in image.tags if t.startswith(f"{repository}-deps:")]
        if dep_tags:
            deps.append((image, dep_tags))
            continue
        labels = image.labels or {}
        model, number = labels.get(f"{LABEL_PREFIX}model"), labels.get(f"{LABEL_PREFIX}version", "")
        if not tags or not model or not number.isdigit():
            staying.append(image)  # not a version image of ours
            continue
        version = (model, int(number))
        if recorded.get(version) != labels.get(f"{LABEL_PREFIX}digest"):
            staying.append(image)  # another control plane's, or a version this store does not know
            continue
        if version in keep:
            plan.keep += [(t, keep[version]) for t in tags]
            staying.append(image)
            continue
        plan.remove += [(t, f"{model} v{number}: no live deployment, not on an endpoint, no release") for t in tags]
        plan.bytes += int(image.attrs.get("Size") or 0)
    for image, dep_tags in deps:
        if keep_dependencies is not None:
            plan.keep += [(t, keep_dependencies) for t in dep_tags]
            continue
        mine = _layers(image)
        users = [other for other in staying
                 if len(theirs := _layers(other)) > len(mine) and theirs[:len(mine)] == mine]
        if users:
            names = sorted({t for u in users for t in u.tags} or {u.short_id for u in users})
            plan.keep += [(t, f"the dependencies of {', '.join(names[:3])}"
                              + (f" and {len(names) - 3} more" if len(names) > 3 else "")) for t in dep_tags]
        else:
            plan.remove += [(t, "dependencies no image left uses") for t in dep_tags]
            plan.bytes += int(image.attrs.get("Size") or 0)
    return plan


def remove_tags(client: Any, tags: list[tuple[str, str]], log: Callable[[str], None]) -> tuple[int, list[str]]:
    """Untag each (tag, why it goes): the image goes with its last tag. Returns how many went and
    the refusals."""
    import docker  # the SDK only where an engine is used

    removed, refused = 0, []
    for tag, why in tags:
        try:
            client.images.remove(tag)
        except docker.errors.ImageNotFound:
            log(f"{tag}: gone already")
        except docker.errors.APIError as e:
            refused.append(f"{tag}: {e.explanation or e}")
            log(f"kept {tag}: the engine refused ({e.explanation or e})")
        else:
            removed += 1
            log(f"removed {tag}: {why}")
    return removed, refused
