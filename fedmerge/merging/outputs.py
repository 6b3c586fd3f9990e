"""What a merged folder holds beside its weights: tokenizer, model card, the config it came from.

``MergeOutputs`` is the engine's ``OutputFiles`` for merges run from a config file. Before the
folder is committed it writes:

- the output tokenizer when the recipe builds one (``tokenizer_source`` / ``tokenizer:``), or the
  base's tokenizer with the recipe's ``chat_template`` (otherwise the base's tokenizer files are
  copied unchanged by the engine);
- ``merge_config.yaml``, the document the merge ran from, byte for byte;
- ``README.md``, a model card (huggingface_hub's ``ModelCard``) with the method and its paper,
  the base and every input with its content fingerprint, and the config.

It completes ``fedmerge.json`` too: inputs the engine could not fingerprint while streaming (a
slice reads only part of a model) are fingerprinted here.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from fedmerge.merging.multimerge import CONFIG_COPY

log = logging.getLogger(__name__)


class MergeOutputs:
    def __init__(self, config_text: str, plan: Any, name: str, fingerprints: bool = True, progress: bool = False):
        self.config_text = config_text
        self.name = name
        self.progress = progress
        self.plan = plan
        self.vocab = None  # set by a recipe that builds a tokenizer
        self.chat_template = getattr(plan, "chat_template", None)
        self.fingerprints = fingerprints

    def write(self, folder: Path, metadata: dict[str, Any]) -> set[str]:
        written = self._tokenizer(folder, metadata)
        (folder / CONFIG_COPY).write_text(self.config_text, encoding="utf-8")
        if self.fingerprints and self.plan.spec.fingerprints:
            _complete_fingerprints(metadata, self.progress)
        model_card(metadata, self.config_text, self.name).save(folder / "README.md")
        return written

    def _tokenizer(self, folder: Path, metadata: dict[str, Any]) -> set[str]:
        from fedmerge.merging.vocab import load_tokenizer, resolve_chat_template, write_tokenizer

        if self.vocab is None and self.chat_template is None:
            return set()
        template = None
        if self.chat_template is not None:
            template = resolve_chat_template(self.chat_template, self.plan.model_folders)
            if template is None:
                log.warning("chat_template: auto found no chat template in the inputs' tokenizers; none is set")
        if self.vocab is not None:
            tokenizer = self.vocab.tokenizer
            metadata["vocabulary"] = {"size": len(self.vocab.vocab), "rows": self.vocab.rows}
        else:
            if template is None:
                return set()
            tokenizer = load_tokenizer(Path(metadata["base"]["path"]))
        written = write_tokenizer(folder, tokenizer, template)
        if template is not None:
            metadata["chat_template"] = "auto" if self.chat_template == "auto" else "given"
        return written


def _complete_fingerprints(metadata: dict[str, Any], progress: bool) -> None:
    """Fingerprint the models the merge read only in part (slices, remapped embeddings): one
    more pass over each of them, since the record must name every input by its content."""
    from fedmerge.checkpoints import CheckpointReader, model_fingerprint

    entries = [metadata.get("base") or {}, *(metadata.get("inputs") or []), *(metadata.get("references") or [])]
    for entry in entries:
        if entry.get("path") and not entry.get("fingerprint") and entry.get("kind", "model") == "model":
            with CheckpointReader(entry["path"]) as r:
                entry["fingerprint"] = model_fingerprint(r, progress=progress)


def model_card(metadata: dict[str, Any], config_text: str, name: str):
    """A huggingface_hub ``ModelCard`` describing the merge recorded in ``metadata``."""
    from huggingface_hub import ModelCard, ModelCardData

    method = metadata.get("method", "?")
    data = ModelCardData(library_name="transformers", tags=["merge", "fedmerge", str(method)])
    paper = metadata.get("paper")
    lines = [
        f"# {metadata.get('merge_name') or name}",
        "",
        f"Merged with fedmerge {metadata.get('fedmerge_version', '')} using **{method}**" + (f" ({paper})." if paper else "."),
        "",
        "## Inputs",
        "",
        "| role | model | kind | fingerprint |",
        "|---|---|---|---|",
    ]
    base = metadata.get("base") or {}
    if base.get("path"):
        lines.append(f"| base | `{base['path']}` | model | `{base.get('fingerprint') or '-'}` |")
    for role, key in (("input", "inputs"), ("slice source", "references")):
        for entry in metadata.get(key) or []:
            what = entry.get("path", "?") + (f"` + `{entry['adapter']}" if entry.get("adapter") else "")
            lines.append(f"| {role} | `{what}` | {entry.get('kind', '?')} | `{entry.get('fingerprint') or '-'}` |")
    lines += [
        "",
        f"Compute dtype {metadata.get('dtype')}, written as {metadata.get('out_dtype') or 'the base dtype'}; seed {metadata.get('seed')}.",
        "",
        "## Configuration",
        "",
        "```yaml",
        config_text.rstrip(),
        "```",
        "",
    ]
    return ModelCard(f"---\n{data.to_yaml()}\n---\n\n" + "\n".join(lines))


__all__ = ["MergeOutputs", "model_card"]
