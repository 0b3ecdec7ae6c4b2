"""Which scoring images on the engine can go, and removing them (``modelcd images prune``).

A version's image is ``{repository}/{model}:{version}-{digest12}`` with modelcd's labels
(``builders.image``); the dependencies image of a lock is ``{repository}-deps:{abi}-{key}``
(``builders.image_deps``). ``plan_prune`` looks only at those two repositories and, among the
version images, only at the versions this control plane recorded (same model, version and
digest: another modelcd sharing the engine and repository keeps its own), among the dependencies
images only at those its builds used; it removes a version's image unless ``keep`` names the
version, and a dependencies image only when no image left on the engine was built on it (its
layers are the start of another image's). Removal is by tag, never forced: an image a container
still uses stays (said so).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from modelcd.builders.image import LABEL_PREFIX, MARKER
from modelcd.builders.image_deps import KEY_LABEL, key_of

Version = tuple[str, int]  # (model, version number)


@dataclass
class PrunePlan:
    """The tags that go and those that stay, each with why."""

    remove: list[tuple[str, str]] = field(default_factory=list)  # (tag, why it goes)
    keep: list[tuple[str, str]] = field(default_factory=list)  # (tag, why it stays)
    bytes: int = 0  # what the images that go hold on their own (not the layers they share with others)


def _layers(image: Any) -> list[str]:
    return list((image.attrs.get("RootFS") or {}).get("Layers") or [])


def _own_size(image: Any, images: list[Any]) -> int:
    """Bytes only ``image`` holds: its size less that of the largest image its layers start with."""
    mine, size = _layers(image), int(image.attrs.get("Size") or 0)
    under = [int(o.attrs.get("Size") or 0) for o in images
             if o.id != image.id and 0 < len(theirs := _layers(o)) < len(mine) and mine[:len(theirs)] == theirs]
    return max(0, size - max(under, default=0))


def our_dependency_keys(client: Any, home: Path) -> set[str]:
    """The keys of the dependencies images this control plane's image builds used (each build
    context's ``bundle.json``: the lock's key and the base image, whose id the key holds)."""
    keys, base_ids = set(), {}
    for marker in (Path(home) / "images").glob(f"*/*/{MARKER}"):
        try:
            meta = json.loads(marker.read_text())
            base = meta["base_image"]
            if base not in base_ids:
                base_ids[base] = client.images.get(base).id
            keys.add(key_of(meta["env_key"], base_ids[base]))
        except Exception:  # a context half written, a base image gone: none of ours to find
            continue
    return keys


def plan_prune(client: Any, repository: str, recorded: dict[Version, str], keep: dict[Version, str],
               dependency_keys: set[str], keep_dependencies: str | None = None,
               registry: str | None = None) -> PrunePlan:
    """``recorded``: every version of this control plane with its digest; ``keep``: the versions
    whose images must stay, each with the reason; ``dependency_keys``: the dependencies images
    this control plane built on (``our_dependency_keys``; others are not looked at);
    ``keep_dependencies``: why every dependencies image stays (a build may be about to use one
    no image is built on yet), or None; ``registry``: where images are pushed (their pushed tags
    go too)."""
    plan = PrunePlan()
    prefixes = (f"{repository}/", f"{registry}/{repository}/") if registry else (f"{repository}/",)
    images = client.images.list()
    staying: list[Any] = []
    deps: list[tuple[Any, list[str]]] = []
    for image in images:
        tags = [t for t in image.tags if t.startswith(prefixes)]
        labels = image.labels or {}
        dep_tags = [t for t in image.tags if t.startswith(f"{repository}-deps:")]
        if dep_tags:
            if labels.get(KEY_LABEL) in dependency_keys:
                deps.append((image, dep_tags))
            continue
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
        plan.bytes += _own_size(image, images)
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
