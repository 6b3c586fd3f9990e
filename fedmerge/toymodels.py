"""Tiny, locally built Mistral-architecture checkpoints for tests, benchmarks and the quick start.

Nothing here downloads anything: the config is written by hand, the weights are seeded random
(or a seeded perturbation of another checkpoint), and the tokenizer is a byte-level BPE trained
on a few lines of text in a fraction of a second. The result is a real HF folder that
``transformers.AutoModelForCausalLM.from_pretrained`` and ``lm_eval`` load offline.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterable

_DEFAULT_TEXT = (
    "the patient presents with chest pain and shortness of breath. "
    "aspirin is given for suspected myocardial infarction. "
    "a child with fever and rash may have measles. "
    "metformin is first line for type two diabetes. "
    "the tumour was staged and chemotherapy was started. "
    "question: which drug is contraindicated in asthma? answer: propranolol. "
)


@dataclass(frozen=True)
class TinyMistralSpec:
    vocab_size: int = 512
    hidden_size: int = 64
    intermediate_size: int = 128
    num_hidden_layers: int = 2
    num_attention_heads: int = 4
    num_key_value_heads: int = 2
    max_position_embeddings: int = 256
    tie_word_embeddings: bool = False

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads


def train_tokenizer(out_dir: str | Path, vocab_size: int = 512, texts: Iterable[str] | None = None) -> Path:
    """Train a byte-level BPE tokenizer locally and save it as an HF fast tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<s>", "</s>", "<pad>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    corpus = list(texts) if texts is not None else [_DEFAULT_TEXT] * 4
    tok.train_from_iterator(corpus, trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>")
    fast.save_pretrained(str(out))
    return out


def mistral_config(spec: TinyMistralSpec, vocab_size: int | None = None):
    from transformers import MistralConfig

    return MistralConfig(
        vocab_size=vocab_size or spec.vocab_size,
        hidden_size=spec.hidden_size,
        intermediate_size=spec.intermediate_size,
        num_hidden_layers=spec.num_hidden_layers,
        num_attention_heads=spec.num_attention_heads,
        num_key_value_heads=spec.num_key_value_heads,
        head_dim=spec.head_dim,
        max_position_embeddings=spec.max_position_embeddings,
        tie_word_embeddings=spec.tie_word_embeddings,
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=2,
        sliding_window=None,
    )


def build_tiny_mistral(out_dir: str | Path, spec: TinyMistralSpec = TinyMistralSpec(), seed: int = 0, dtype: str = "float32", tokenizer: bool = True) -> Path:
    """Write a randomly initialised tiny Mistral (seeded) with a local tokenizer to ``out_dir``."""
    import torch
    from transformers import MistralForCausalLM

    out = Path(out_dir)
    vocab = spec.vocab_size
    if tokenizer:
        train_tokenizer(out, vocab_size=spec.vocab_size)
        vocab = max(vocab, len(json.loads((out / "tokenizer.json").read_text())["model"]["vocab"]) + 3)
    torch.manual_seed(seed)
    model = MistralForCausalLM(mistral_config(spec, vocab_size=vocab))
    model.to(getattr(torch, dtype))
    model.save_pretrained(str(out), safe_serialization=True)
    (out / "tinymistral.json").write_text(json.dumps({"spec": asdict(spec), "seed": seed}, indent=2))
    return out


def perturb_checkpoint(base_dir: str | Path, out_dir: str | Path, seed: int, scale: float = 0.01, density: float = 1.0) -> Path:
    """A stand-in "fine-tune": base + seeded Gaussian noise (optionally sparse) on every float tensor.

    Written with the base's sidecar files (config, tokenizer), so it loads like the base.
    """
    import torch

    from fedmerge.checkpoints import CheckpointReader, CheckpointWriter

    reader = CheckpointReader(base_dir)
    gen = torch.Generator().manual_seed(seed)
    with CheckpointWriter(out_dir) as writer:
        for name in reader.names():
            t = reader.get(name)
            if t.is_floating_point():
                noise = torch.randn(t.shape, generator=gen) * scale * (t.float().std().item() or 1.0)
                if density < 1.0:
                    noise *= torch.rand(t.shape, generator=gen) < density
                t = (t.float() + noise).to(t.dtype)
            writer.add(name, t)
        writer.commit(sidecars_from=base_dir, metadata={"perturbed_from": str(base_dir), "seed": seed, "scale": scale})
    return Path(out_dir)
