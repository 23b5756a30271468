"""A small renderer for the Kustomize features Hearth's overlays use:
`resources` (files, or directories with a kustomization), `images`
(`newName`, `newTag`) and `patches` (strategic-merge files with a `kind` and
`name` target). Debian's `kubectl kustomize` is too old to trust here, and
Kustomize is not installable; this renders what `kubectl apply -k` would."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any, Dict, List

import yaml


def render(directory: Path) -> List[Dict[str, Any]]:
    """The objects the kustomization in `directory` produces."""
    spec = yaml.safe_load((directory / "kustomization.yaml").read_text())
    unknown = set(spec) - {"apiVersion", "kind", "resources", "images", "patches"}
    if unknown:
        raise ValueError(f"{directory}: the renderer does not know {sorted(unknown)}")
    objects: List[Dict[str, Any]] = []
    for resource in spec.get("resources", []):
        path = (directory / resource).resolve()
        if path.is_dir():
            objects.extend(render(path))
        else:
            objects.extend(doc for doc in yaml.safe_load_all(path.read_text()) if doc)
    for patch in spec.get("patches", []):
        body = yaml.safe_load((directory / patch["path"]).read_text())
        target = patch["target"]
        hits = [o for o in objects if o["kind"] == target["kind"] and o["metadata"]["name"] == target["name"]]
        if len(hits) != 1:
            raise ValueError(f"{directory}: patch {patch['path']} matches {len(hits)} objects")
        merged = merge(hits[0], body)
        hits[0].clear()
        hits[0].update(merged)
    for image in spec.get("images", []):
        for obj in objects:
            for container in containers(obj):
                name, _, _tag = container["image"].partition(":")
                if name == image["name"]:
                    new_name = image.get("newName", name)
                    container["image"] = f"{new_name}:{image['newTag']}" if "newTag" in image else new_name
    return objects


def containers(obj: Dict[str, Any]) -> List[Dict[str, Any]]:
    pod = obj.get("spec", {}).get("template", {}).get("spec", {})
    return pod.get("containers", []) + pod.get("initContainers", [])


def merge(base: Any, patch: Any) -> Any:
    """Strategic merge, as far as these patches need it: maps merge key by
    key; lists of maps with `name` merge item by item; anything else is
    replaced."""
    if isinstance(base, dict) and isinstance(patch, dict):
        out = copy.deepcopy(base)
        for key, value in patch.items():
            out[key] = merge(base[key], value) if key in base else copy.deepcopy(value)
        return out
    if (
        isinstance(base, list)
        and isinstance(patch, list)
        and all(isinstance(i, dict) and "name" in i for i in base + patch)
    ):
        out = copy.deepcopy(base)
        for item in patch:
            match = next((i for i, b in enumerate(out) if b["name"] == item["name"]), None)
            if match is None:
                out.append(copy.deepcopy(item))
            else:
                out[match] = merge(out[match], item)
        return out
    return copy.deepcopy(patch)
