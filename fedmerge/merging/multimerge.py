"""Files of several merge documents (mergekit-multi), and running any document with its outputs.

A YAML file may hold several documents separated by ``---``. Each is a merge config of either
format with an optional ``name:``; wherever a document names a model (``model:``, ``base_model:``,
``path:``, ``base:``, ``tokenizer_source``...) it may give an earlier document's name instead,
and gets that document's output. Documents run in dependency order (a cycle or an unknown
dependency is refused before anything runs):

- the unnamed document (at most one) is written to ``OUTPUT_DIR``; named ones to
  ``INTERMEDIATE_DIR/NAME`` (by default ``OUTPUT_DIR-intermediates`` beside it);
- with no unnamed document, every named one is written to ``OUTPUT_DIR/NAME``;
- a named output that already exists is reused when it was made from the same document (and the
  same dependencies), as mergekit-multi's ``--lazy`` does; made from another, it is refused
  unless overwriting was asked for.

Every output folder gets a copy of its document (``merge_config.yaml``), a model card
(``README.md``) and ``fedmerge.json`` naming the config file by absolute path.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fedmerge.merging.engine import MergeResult
from fedmerge.merging.mergeconfig import MergeConfigError, read_document

log = logging.getLogger(__name__)

CONFIG_COPY = "merge_config.yaml"


@dataclass
class YamlDocument:
    data: Any
    text: str
    index: int


@dataclass
class MergeDocument:
    name: str | None
    index: int
    text: str
    plan: Any  # MergePlan or MergekitRecipe
    out_dir: Path
    depends: set[str] = field(default_factory=set)
    digest: str = ""


def read_yaml_documents(path: Path) -> list[YamlDocument]:
    """Every document of a YAML file, with its own text; errors name the file."""
    import yaml

    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise MergeConfigError(f"{path}: no such config file") from None
    except IsADirectoryError:
        raise MergeConfigError(f"{path}: is a folder, expected a YAML config file") from None
    try:
        nodes = list(yaml.compose_all(text, Loader=yaml.SafeLoader))
        datas = list(yaml.safe_load_all(text))
    except yaml.YAMLError as exc:
        raise MergeConfigError(f"{path}: not valid YAML ({exc})") from None
    docs = []
    for i, (node, data) in enumerate(zip(nodes, datas)):
        if node is None or data is None:
            continue
        docs.append(YamlDocument(data, text[node.start_mark.index : node.end_mark.index].strip() + "\n", i))
    if not docs:
        raise MergeConfigError(f"{path}: holds no merge config (the file is empty)")
    if len(docs) == 1:
        docs[0].text = text
    return docs


def load_documents(path: str | os.PathLike[str], out_dir: str | os.PathLike[str], intermediate_dir: str | os.PathLike[str] | None = None) -> list[MergeDocument]:
    """The documents of ``path`` in the order they must run, each with its output folder."""
    cfg_path = Path(path)
    out_dir = Path(out_dir)
    raw = read_yaml_documents(cfg_path)
    names: list[str | None] = []
    for d in raw:
        name = d.data.get("name") if isinstance(d.data, dict) else None
        if name is not None and (not isinstance(name, str) or not name or "/" in name or name.startswith(".")):
            raise MergeConfigError(f"{cfg_path} (document {d.index + 1}): name: {name!r} must be a plain folder name")
        if name in names:
            what = f"name {name!r} is used by two documents" if name else "more than one document has no name; only the final merge may be unnamed"
            raise MergeConfigError(f"{cfg_path} (document {d.index + 1}): {what}")
        names.append(name)
    if len(raw) == 1:  # one document: its name, if any, names nothing else; it goes to OUTPUT_DIR
        plan = read_document(raw[0].data, cfg_path)
        doc = MergeDocument(None, 0, raw[0].text, plan, out_dir)
        doc.digest = _digest(doc.text, [])
        return [doc]
    has_final = None in names
    inter = Path(intermediate_dir) if intermediate_dir is not None else (out_dir.parent / f"{out_dir.name}-intermediates" if has_final else out_dir)
    named = {n: (inter / n).resolve() for n in names if n is not None}
    docs = []
    for d, name in zip(raw, names):
        which = f" (document {d.index + 1}{', ' + name if name else ''})"
        plan = read_document(d.data, cfg_path, named, which)
        target = (inter / name) if name is not None else out_dir
        docs.append(MergeDocument(name, d.index, d.text, plan, target, set(plan.depends)))
    return _in_order(docs, cfg_path)


def _in_order(docs: list[MergeDocument], cfg_path: Path) -> list[MergeDocument]:
    by_name = {d.name: d for d in docs}
    order: list[MergeDocument] = []
    state: dict[int, str] = {}

    def visit(d: MergeDocument, chain: list[str]) -> None:
        if state.get(id(d)) == "done":
            return
        if state.get(id(d)) == "active":
            raise MergeConfigError(f"{cfg_path}: documents depend on each other in a cycle: {' -> '.join([*chain, d.name or '(final)'])}")
        state[id(d)] = "active"
        for dep in sorted(d.depends):
            visit(by_name[dep], [*chain, d.name or "(final)"])
        state[id(d)] = "done"
        d.digest = _digest(d.text, [by_name[x].digest for x in sorted(d.depends)])
        order.append(d)

    for d in docs:
        visit(d, [])
    return order


def _digest(text: str, deps: list[str]) -> str:
    h = hashlib.sha256(text.encode())
    for x in deps:
        h.update(x.encode())
    return "sha256:" + h.hexdigest()


def reusable(doc: MergeDocument) -> bool:
    """Whether ``doc``'s output exists from this very document (and dependencies)."""
    meta = doc.out_dir / "fedmerge.json"
    if not meta.exists():
        return False
    try:
        return json.loads(meta.read_text()).get("config_digest") == doc.digest
    except ValueError:
        return False


def run_document(doc: MergeDocument, progress: bool = True, overwrite: bool = False) -> MergeResult:
    """Merge one document into its output folder, with the model card and the config copy."""
    from fedmerge.merging.outputs import MergeOutputs

    plan = doc.plan
    metadata = {
        "config": CONFIG_COPY,
        "config_source": str(Path(plan.source).resolve()),
        "config_format": plan.format,
        "config_digest": doc.digest,
    }
    if doc.name is not None:
        metadata["merge_name"] = doc.name
    outputs = MergeOutputs(doc.text, plan, doc.out_dir.name, progress=progress)
    return plan.run(doc.out_dir, progress=progress, overwrite=overwrite, outputs=outputs, metadata=metadata)


__all__ = ["CONFIG_COPY", "MergeDocument", "YamlDocument", "load_documents", "read_yaml_documents", "reusable", "run_document"]
