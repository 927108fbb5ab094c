"""A small kustomize renderer for the subset deploy/k8s uses, so CI needs no kubectl.

Supported: ``resources`` (files and kustomization directories), ``configMapGenerator``
(files, options.labels / annotations) with ``disableNameSuffixHash``, ``labels`` without
selectors, ``images``, ``namespace``, and ``patches`` (strategic-merge files, ``$patch: delete``
included, and inline JSON 6902 with a target). Anything else raises, so a new feature in
deploy/ cannot be silently ignored by the tests. ``tests/observability/test_k8s.py`` checks the output
against ``kubectl kustomize`` where kubectl is installed.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import yaml

Doc = dict[str, Any]
_KNOWN = {
    "apiVersion",
    "kind",
    "resources",
    "configMapGenerator",
    "generatorOptions",
    "labels",
    "images",
    "namespace",
    "patches",
}


def render(directory: Path) -> list[Doc]:
    """Every object the kustomization in ``directory`` produces."""
    spec = yaml.safe_load((directory / "kustomization.yaml").read_text())
    unknown = set(spec) - _KNOWN
    if unknown:
        raise ValueError(f"{directory}: unsupported kustomization fields {sorted(unknown)}")
    docs: list[Doc] = []
    for res in spec.get("resources", []):
        path = (directory / res).resolve()
        if path.is_dir():
            docs.extend(render(path))
        else:
            docs.extend(d for d in yaml.safe_load_all(path.read_text()) if d)
    options = spec.get("generatorOptions", {})
    if spec.get("configMapGenerator") and not options.get("disableNameSuffixHash", False):
        raise ValueError(f"{directory}: name-suffix hashes are not rendered; set disableNameSuffixHash")
    for gen in spec.get("configMapGenerator", []):
        docs.append(_config_map(directory, gen))
    for patch in spec.get("patches", []):
        _apply_patch(directory, patch, docs)
    for img in spec.get("images", []):
        _set_image(docs, img)
    for group in spec.get("labels", []):
        if group.get("includeSelectors") or group.get("includeTemplates"):
            raise ValueError("labels with includeSelectors/includeTemplates are not rendered")
        for d in docs:
            d.setdefault("metadata", {}).setdefault("labels", {}).update(group["pairs"])
    if "namespace" in spec:
        for d in docs:
            d["metadata"]["namespace"] = spec["namespace"]
    return docs


def _config_map(directory: Path, gen: Doc) -> Doc:
    data = {Path(f).name: (directory / f).read_text() for f in gen.get("files", [])}
    meta: Doc = {"name": gen["name"]}
    opts = gen.get("options", {})
    if "labels" in opts:
        meta["labels"] = dict(opts["labels"])
    if "annotations" in opts:
        meta["annotations"] = dict(opts["annotations"])
    return {"apiVersion": "v1", "kind": "ConfigMap", "metadata": meta, "data": data}


def _set_image(docs: list[Doc], img: Doc) -> None:
    for d in docs:
        pod = d.get("spec", {}).get("template", {}).get("spec", {})
        for c in pod.get("containers", []) + pod.get("initContainers", []):
            name, _, tag = c["image"].partition(":")
            if name == img["name"]:
                c["image"] = (
                    f"{img.get('newName', name)}:{img.get('newTag', tag)}"
                    if ("newTag" in img or tag)
                    else img.get("newName", name)
                )


def _apply_patch(directory: Path, patch: Doc, docs: list[Doc]) -> None:
    if "path" in patch:
        body = yaml.safe_load((directory / patch["path"]).read_text())
        target = _find(docs, body["kind"], body["metadata"]["name"])
        if body.get("$patch") == "delete":  # strategic merge's "remove this object"
            docs.remove(target)
            return
        merged = _strategic_merge(target, body)
        target.clear()
        target.update(merged)
        return
    tgt = patch["target"]
    ops = yaml.safe_load(patch["patch"])
    doc = _find(docs, tgt["kind"], tgt["name"])
    for op in ops:
        _json_patch(doc, op)


def _find(docs: list[Doc], kind: str, name: str) -> Doc:
    for d in docs:
        if d["kind"] == kind and d["metadata"]["name"] == name:
            return d
    raise KeyError(f"patch target {kind}/{name} not found")


def _strategic_merge(base: Any, patch: Any) -> Any:
    """Maps merge key by key; lists of named maps merge by name; any other list is replaced."""
    if isinstance(base, dict) and isinstance(patch, dict):
        out = copy.deepcopy(base)
        for k, v in patch.items():
            out[k] = _strategic_merge(out[k], v) if k in out else copy.deepcopy(v)
        return out
    named = lambda xs: isinstance(xs, list) and all(isinstance(x, dict) and "name" in x for x in xs)  # noqa: E731
    if named(base) and named(patch) and patch:
        # Like kustomize: the patch's items come first, in patch order (merged into the base's item
        # of that name, if any), then the base's items the patch does not name.
        bases = {b["name"]: b for b in base}
        named_first = [
            _strategic_merge(bases[x["name"]], x) if x["name"] in bases else copy.deepcopy(x) for x in patch
        ]
        rest = [copy.deepcopy(b) for b in base if b["name"] not in {x["name"] for x in patch}]
        return named_first + rest
    return copy.deepcopy(patch)


def _json_patch(doc: Doc, op: Doc) -> None:
    parts = [p.replace("~1", "/").replace("~0", "~") for p in op["path"].lstrip("/").split("/")]
    parent: Any = doc
    for p in parts[:-1]:
        parent = parent[int(p)] if isinstance(parent, list) else parent[p]
    last = parts[-1]
    if op["op"] in ("add", "replace"):
        if isinstance(parent, list):
            parent.insert(len(parent) if last == "-" else int(last), copy.deepcopy(op["value"]))
            if op["op"] == "replace":
                del parent[int(last) + 1]
        else:
            if op["op"] == "replace" and last not in parent:
                raise KeyError(f"replace of missing {op['path']}")
            parent[last] = copy.deepcopy(op["value"])
    elif op["op"] == "remove":
        del parent[int(last) if isinstance(parent, list) else last]
    else:
        raise ValueError(f"unsupported JSON patch op {op['op']!r}")
