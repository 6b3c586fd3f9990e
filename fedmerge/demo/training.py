"""The training loop, nanoGPT style: one token stream, random windows, AdamW, cosine schedule.

Used twice: to pretrain the base on general medicine and to fine-tune each hospital's copy of
it on its specialty (a full fine-tune: every weight moves, as BioMistral's did).
"""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class TrainSettings:
    steps: int
    lr: float
    batch_size: int
    block_size: int
    warmup_steps: int = 20
    weight_decay: float = 0.01
    min_lr_ratio: float = 0.1
    grad_clip: float = 1.0


def token_stream(tokenizer, docs: list[str]):
    """All documents as one 1-D tensor of ids, each followed by the end-of-text token."""
    import torch

    ids: list[int] = []
    for doc in docs:
        ids.extend(tokenizer(doc, add_special_tokens=False)["input_ids"])
        ids.append(tokenizer.eos_token_id)
    return torch.tensor(ids, dtype=torch.long)


def lr_at(step: int, s: TrainSettings) -> float:
    """Linear warm-up, then cosine decay to ``min_lr_ratio * lr``."""
    if step < s.warmup_steps:
        return s.lr * (step + 1) / s.warmup_steps
    progress = (step - s.warmup_steps) / max(1, s.steps - s.warmup_steps)
    return s.lr * (s.min_lr_ratio + (1 - s.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def train(model, stream, settings: TrainSettings, seed: int, desc: str = "training") -> list[float]:
    """Train ``model`` in place on random windows of ``stream``; returns the loss of every step."""
    import torch

    from fedmerge import console

    if len(stream) <= settings.block_size + 1:
        raise ValueError(f"{desc}: the corpus has {len(stream)} tokens, fewer than one block of {settings.block_size}")
    gen = torch.Generator().manual_seed(seed)
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": settings.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=settings.lr,
        betas=(0.9, 0.95),
    )
    model.train()
    losses: list[float] = []
    with console.stage(desc, total=settings.steps, unit="steps") as st:
        for step in range(settings.steps):
            starts = torch.randint(0, len(stream) - settings.block_size - 1, (settings.batch_size,), generator=gen)
            x = torch.stack([stream[s : s + settings.block_size] for s in starts])
            for group in opt.param_groups:
                group["lr"] = lr_at(step, settings)
            loss = model(input_ids=x, labels=x).loss
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), settings.grad_clip)
            opt.step()
            losses.append(loss.item())
            st.advance()
        st.note(f"loss {losses[0]:.2f} -> {losses[-1]:.2f}")
    model.eval()
    return losses
