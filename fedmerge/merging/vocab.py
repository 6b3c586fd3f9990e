"""Output vocabularies: mergekit's ``tokenizer_source`` / ``tokenizer:`` and ``chat_template``.

``build_vocab_plan`` decides the output tokenizer and how every model's embedding rows map onto
it; ``VocabPlan.remap`` then re-indexes the rows of one embedding tensor (input embedding or
output head) of every model, before the merge method sees them. The rules are mergekit's:

- the base tokenizer (``base_model``, else the first model) keeps only the tokens its embedding
  has rows for (ids below its config's ``vocab_size``);
- source ``base``: the output vocabulary is the base's; ``union``: the base's, plus every token
  of the other models' tokenizers it lacks (added as new tokens, then their added/special tokens),
  each appended after the base's; a model folder: that model's tokenizer;
- tokens named under ``tokenizer.tokens`` are added when missing;
- for each model, a token it has keeps its own row; a token it lacks gets a fallback row: the
  configured source for that token if any; else the only model that has it; else the base's row
  when the base has it; else the mean of the rows of the models that have it (zero if none has
  it). ``force: true`` gives the configured row to every model, even one that has the token;
- with ``pad_to_multiple_of``, the row count is rounded up and the extra rows are the mean of the
  real rows.

Where mergekit's order is not defined (it walks a set of models and the tokenizers' hash maps, so
the ids of tokens new to the base can differ between its runs), fedmerge takes the config's
model order and each tokenizer's id order: the same config always gives the same ids.
"""

from __future__ import annotations

import json
import logging
import tempfile
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from fedmerge.merging.engine import MergeError

log = logging.getLogger(__name__)

# Files that describe a tokenizer; a folder that gets a new tokenizer gets none of the base's.
TOKENIZER_FILES = frozenset(
    {"tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model", "vocab.json", "merges.txt", "added_tokens.json", "chat_template.jinja", "chat_template.json"}
)


class VocabError(MergeError):
    """The output vocabulary or chat template cannot be built as asked."""


@dataclass(frozen=True)
class TokenRow:
    """Where a configured token's fallback row comes from (mergekit's ``tokens:`` entries)."""

    kind: Literal["model", "model_token", "zero"]
    model: str | None = None  # model key
    token_id: int | None = None
    token: str | None = None
    force: bool = False


@dataclass
class VocabPlan:
    tokenizer: Any  # the output tokenizer (a transformers tokenizer)
    vocab: dict[str, int]  # output token -> id
    rows: int  # embedding rows of the output (the vocabulary, padded)
    base_key: str | None
    permutations: dict[str, "Any"]  # model key -> LongTensor [len(vocab)]: its row for each output id, -1 if absent
    original_vocabs: dict[str, dict[str, int]]
    tokens: dict[str, TokenRow] = field(default_factory=dict)

    def remap(self, weights: dict[str, Any]) -> dict[str, Any]:
        """Re-index the rows of one embedding tensor of each model (``key -> [rows_in, d]``) to the
        output vocabulary (``key -> [rows, d]``)."""
        import torch

        keys = list(weights)
        dims = {tuple(w.shape[1:]) for w in weights.values()}
        if len(dims) != 1:
            raise VocabError(f"embedding widths differ between models ({sorted(dims)}); they cannot share rows")
        n = len(self.vocab)
        present = {k: self.permutations[k] >= 0 for k in keys}
        first = weights[keys[0]]
        fallback = torch.zeros((n, *first.shape[1:]), dtype=first.dtype)
        configured = torch.zeros(n, dtype=torch.bool)
        forced = torch.zeros(n, dtype=torch.bool)
        for tok, row in self.tokens.items():
            tid = self.vocab[tok]
            configured[tid] = True
            forced[tid] = row.force
            fallback[tid] = self._configured_row(tok, tid, row, weights)
        count = torch.stack([present[k] for k in keys]).sum(0)
        unconfigured = ~configured
        # Exactly one model has the token: its row.
        for k in keys:
            sel = unconfigured & (count == 1) & present[k]
            fallback[sel] = weights[k][self.permutations[k][sel]]
        # Nobody has it: zero (already).
        # Several have it: the base's row when the base has it, else their mean.
        rest = unconfigured & (count >= 2)
        base_sel = torch.zeros(n, dtype=torch.bool)
        if self.base_key is not None and self.base_key in weights:
            base_sel = rest & present[self.base_key]
            fallback[base_sel] = weights[self.base_key][self.permutations[self.base_key][base_sel]]
        avg = rest & ~base_sel
        if bool(avg.any()):
            total = torch.zeros_like(fallback[avg])
            for k in keys:
                m = present[k][avg]
                rows = self.permutations[k][avg]
                total[m] += weights[k][rows[m]]
            fallback[avg] = total / count[avg].unsqueeze(-1).to(total.dtype)
        out = {}
        for k in keys:
            w = weights[k]
            new = torch.empty((self.rows, *w.shape[1:]), dtype=w.dtype)
            own = present[k] & ~forced
            new[:n][own] = w[self.permutations[k][own]]
            new[:n][~own] = fallback[~own]
            if self.rows > n:
                new[n:] = new[:n].mean(0)
            out[k] = new
        return out

    def _configured_row(self, tok: str, tid: int, row: TokenRow, weights: dict[str, Any]):
        import torch

        first = next(iter(weights.values()))
        if row.kind == "zero":
            return torch.zeros(first.shape[1:], dtype=first.dtype)
        if row.model not in weights:
            raise VocabError(f"tokenizer.tokens[{tok!r}].source: model {row.model} is not one of this tensor's inputs")
        w = weights[row.model]
        if row.kind == "model":
            src = int(self.permutations[row.model][tid])
            if src < 0:
                raise VocabError(f"tokenizer.tokens[{tok!r}].source: token {tok!r} is not in {row.model}'s vocabulary")
            return w[src]
        src = row.token_id
        if src is None:
            vocab = self.original_vocabs.get(row.model, {})
            if row.token not in vocab:
                raise VocabError(f"tokenizer.tokens[{tok!r}].source.token: {row.token!r} is not in {row.model}'s vocabulary")
            src = vocab[row.token]
        if not 0 <= src < w.shape[0]:
            raise VocabError(f"tokenizer.tokens[{tok!r}].source.token_id: {src} is out of range for {row.model} ({w.shape[0]} rows)")
        return w[src]


def load_tokenizer(folder: Path):
    """The fast tokenizer of a local model folder (never downloads)."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(folder), use_fast=True, local_files_only=True)
    except Exception as exc:  # transformers raises many kinds here; the message is what matters
        raise VocabError(f"{folder}: its tokenizer cannot be loaded ({exc})") from None


def _config_vocab_size(folder: Path) -> int | None:
    cfg = folder / "config.json"
    if not cfg.exists():
        return None
    try:
        value = json.loads(cfg.read_text()).get("vocab_size")
    except ValueError:
        return None
    return int(value) if isinstance(value, int) else None


def stripped_tokenizer(folder: Path):
    """The tokenizer of ``folder`` without the tokens its embedding has no row for."""
    tok = load_tokenizer(folder)
    size = _config_vocab_size(folder) or len(tok.get_vocab())
    unused = {t for t, i in tok.get_vocab().items() if i >= size}
    if not unused:
        return tok
    if not getattr(tok, "is_fast", False):
        raise VocabError(f"{folder}: its tokenizer has tokens beyond vocab_size={size} and is not a fast tokenizer; it cannot be trimmed")
    data = json.loads(tok.backend_tokenizer.to_str())
    if data["model"]["type"] != "BPE":
        raise VocabError(f"{folder}: its tokenizer has tokens beyond vocab_size={size}; only BPE tokenizers can be trimmed (this one is {data['model']['type']})")
    data["added_tokens"] = [e for e in data.get("added_tokens", []) if e["id"] < size]
    for t in unused:
        data["model"]["vocab"].pop(t, None)

    def keep(merge) -> bool:
        parts = merge.split(" ") if isinstance(merge, str) else list(merge)
        return not any(p in unused for p in parts)

    data["model"]["merges"] = [m for m in data["model"]["merges"] if keep(m)]
    with tempfile.TemporaryDirectory() as tmp:
        tok.save_pretrained(tmp)
        Path(tmp, "tokenizer.json").write_text(json.dumps(data))
        return load_tokenizer(Path(tmp))


def _copy_of(tok):
    """A separate tokenizer equal to ``tok`` (adding tokens to it leaves ``tok`` unchanged)."""
    with tempfile.TemporaryDirectory() as tmp:
        tok.save_pretrained(tmp)
        return load_tokenizer(Path(tmp))


def union_tokenizer(base_tok, tokenizers: dict[str, Any], vocab_sizes: dict[str, int | None]):
    """The base tokenizer plus every token of the others it lacks: plain tokens first, then added
    (special) tokens, each in model order and id order."""
    new_plain: list[str] = []
    new_added: dict[str, Any] = {}
    seen_plain: set[str] = set()
    for key, tok in tokenizers.items():
        size = vocab_sizes.get(key) or tok.vocab_size
        added = {i: t for i, t in tok.added_tokens_decoder.items()}
        added_content = {t.content for t in added.values()}
        for t, i in sorted(tok.get_vocab().items(), key=lambda kv: kv[1]):
            if i >= size:
                log.warning("token %r of %s has id %d beyond its vocab_size %d; left out", t, key, i, size)
                continue
            if t in added_content or t in seen_plain:
                continue
            seen_plain.add(t)
            new_plain.append(t)
        for i, info in sorted(added.items()):
            if i >= size:
                continue
            if info.content in new_added:
                if str(new_added[info.content]) != str(info):
                    log.warning("token %r is added with different settings by several models; the first is used", info.content)
                continue
            new_added[info.content] = info
    out = _copy_of(base_tok)
    base_vocab = base_tok.get_vocab()
    for t in new_plain:
        if t not in new_added and t not in base_vocab:
            out.add_tokens(t)
    for info in new_added.values():
        out.add_tokens(info)
    return out


def build_vocab_plan(
    base_key: str,
    models: dict[str, Path],
    source: str,
    tokens: dict[str, TokenRow] | None = None,
    pad_to_multiple_of: int | None = None,
) -> VocabPlan:
    """``models``: key -> folder for every model of the merge, the base's first; ``source``:
    ``base``, ``union`` or a key of ``models``."""
    import torch

    tokens = dict(tokens or {})
    base_tok = stripped_tokenizer(models[base_key])
    tokenizers = {base_key: base_tok}
    for key, folder in models.items():
        if key != base_key:
            tokenizers[key] = load_tokenizer(folder)
    if source == "base":
        out = base_tok
    elif source == "union":
        out = union_tokenizer(base_tok, tokenizers, {k: _config_vocab_size(f) for k, f in models.items()})
    elif source in models:
        out = load_tokenizer(models[source])
    else:
        raise VocabError(f"tokenizer source {source!r} is neither base, union nor one of the merge's models")
    for tok in tokens:
        if tok not in out.get_vocab():
            out.add_tokens(tok)
    vocab = out.get_vocab()
    rows = len(vocab)
    if pad_to_multiple_of and rows % pad_to_multiple_of:
        rows += pad_to_multiple_of - rows % pad_to_multiple_of
    permutations = {}
    for key, folder in models.items():
        mvocab = tokenizers[key].get_vocab()
        size = _config_vocab_size(folder) or len(mvocab)
        p = torch.full((len(vocab),), -1, dtype=torch.long)
        for t, new in vocab.items():
            old = mvocab.get(t)
            if old is not None and old < size:
                p[new] = old
        permutations[key] = p
    return VocabPlan(out, vocab, rows, base_key, permutations, {k: t.get_vocab() for k, t in tokenizers.items()}, tokens)


# -- chat templates -------------------------------------------------------------------------------
def resolve_chat_template(value: str, folders: list[Path]) -> str | None:
    """``auto``: the template most of the models' tokenizers carry (None if none has one); any
    other value must be a Jinja template itself."""
    if value == "auto":
        found = []
        for folder in folders:
            try:
                template = load_tokenizer(folder).chat_template
            except VocabError:
                continue
            if isinstance(template, dict):
                template = template.get("default")
            if template:
                found.append(template.strip())
        if not found:
            return None
        return Counter(found).most_common(1)[0][0]
    if len(value) < 20 or "{" not in value:
        raise VocabError(
            f"chat_template: {value!r} is neither 'auto' nor a Jinja template; fedmerge ships no named templates, "
            "so paste the template itself (e.g. from the model's tokenizer_config.json)"
        )
    return value


def write_tokenizer(folder: Path, tokenizer, chat_template: str | None) -> set[str]:
    """Save ``tokenizer`` (with ``chat_template`` when given) into ``folder``; returns the names
    a copied base tokenizer must not overwrite."""
    if chat_template is not None:
        tokenizer.chat_template = chat_template
    tokenizer.save_pretrained(str(folder))
    return set(TOKENIZER_FILES)


__all__ = ["TOKENIZER_FILES", "TokenRow", "VocabError", "VocabPlan", "build_vocab_plan", "load_tokenizer", "resolve_chat_template", "stripped_tokenizer", "union_tokenizer", "write_tokenizer"]
