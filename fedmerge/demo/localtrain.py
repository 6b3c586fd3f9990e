"""A demo hospital's training between rounds: the client's ``train_hook``.

The hospital client runs this module before it packs a round's contribution, with the
``FEDMERGE_*`` variables ``fedmerge.client`` sets (see ``ClientConfig.train_hook``)::

    python -m fedmerge.demo.localtrain --base BASE --corpus CORPUS.jsonl --steps 40 --lr 0.001 ...

- While the hospital holds no global model yet (its current model is the base), it contributes
  its own fine-tune as it is: the world trained it, once, on the hospital's text.
- Once a global model is installed, the hospital trains a copy of it for a short budget on its
  own text (``CORPUS``: its specialty's training documents, nothing else) and contributes that;
  with ``reference: global`` the coordinator receives ``trained - global``.

The model is written to ``$FEDMERGE_OUTPUT`` under a temporary name and renamed when complete, so
the client never packs half a model; what was done (``LocalUpdate``) is written beside it, to
``$FEDMERGE_OUTPUT.json``, for the demo's report.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

from fedmerge.demo.training import TrainSettings
from fedmerge.devices import torch_threads


@dataclass(frozen=True)
class LocalUpdate:
    """What one hospital did before a round: trained (steps, last loss) or sent its fine-tune."""

    trained: bool
    steps: int = 0
    first_loss: float | None = None
    last_loss: float | None = None


def read_corpus(path: Path) -> list[str]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def train_from(current: Path, docs: list[str], out: Path, settings: TrainSettings, seed: int, threads: int | None = None) -> LocalUpdate:
    """Train a copy of the model in ``current`` on ``docs`` and write it (with its tokenizer) to ``out``."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from fedmerge.demo.training import token_stream, train

    with torch_threads(threads):
        tok = AutoTokenizer.from_pretrained(str(current))
        model = AutoModelForCausalLM.from_pretrained(str(current), torch_dtype=torch.float32)
        losses = train(model, token_stream(tok, docs), settings, seed=seed, desc=f"local training ({out.name})")
        _write_atomically(out, lambda tmp: (model.save_pretrained(str(tmp), safe_serialization=True), tok.save_pretrained(str(tmp))))
    return LocalUpdate(trained=True, steps=settings.steps, first_loss=losses[0], last_loss=sum(losses[-5:]) / len(losses[-5:]))


def send_finetune(finetuned: Path, out: Path) -> LocalUpdate:
    """The hospital's own fine-tune, copied as this round's contribution."""
    _write_atomically(out, lambda tmp: shutil.copytree(finetuned, tmp, dirs_exist_ok=True))
    return LocalUpdate(trained=False)


def _write_atomically(out: Path, write) -> None:
    tmp = out.with_name(f".{out.name}.partial-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        write(tmp)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def hook_command(base: Path, corpus: Path, settings: TrainSettings, seed: int, threads: int) -> list[str]:
    """The ``train_hook`` a demo hospital's client.yaml carries."""
    return [
        sys.executable, "-m", "fedmerge.demo.localtrain", "--base", str(base), "--corpus", str(corpus),
        "--steps", str(settings.steps), "--lr", repr(settings.lr), "--batch-size", str(settings.batch_size),
        "--block-size", str(settings.block_size), "--warmup-steps", str(settings.warmup_steps),
        "--seed", str(seed), "--threads", str(threads),
    ]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m fedmerge.demo.localtrain", description=__doc__.splitlines()[0])
    ap.add_argument("--base", required=True, type=Path, help="the federation's base model")
    ap.add_argument("--corpus", required=True, type=Path, help="the hospital's own training text (JSONL of documents)")
    ap.add_argument("--steps", required=True, type=int)
    ap.add_argument("--lr", required=True, type=float)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--block-size", type=int, default=128)
    ap.add_argument("--warmup-steps", type=int, default=5)
    ap.add_argument("--seed", type=int, default=0, help="the round number is added, so each round draws new windows")
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args(argv)
    try:
        env = {k: os.environ[k] for k in ("FEDMERGE_ROUND", "FEDMERGE_CURRENT_MODEL", "FEDMERGE_FINETUNED", "FEDMERGE_OUTPUT")}
    except KeyError as exc:
        print(f"localtrain: {exc.args[0]} is not set; this runs as a client's train_hook", file=sys.stderr)
        return 2
    out, current = Path(env["FEDMERGE_OUTPUT"]), Path(env["FEDMERGE_CURRENT_MODEL"])
    if current.resolve() == args.base.resolve():
        update = send_finetune(Path(env["FEDMERGE_FINETUNED"]), out)
    else:
        settings = TrainSettings(steps=args.steps, lr=args.lr, batch_size=args.batch_size, block_size=args.block_size, warmup_steps=args.warmup_steps)
        update = train_from(current, read_corpus(args.corpus), out, settings, seed=args.seed + int(env["FEDMERGE_ROUND"]), threads=args.threads)
    report_path(out).write_text(json.dumps(update.__dict__))
    return 0


def report_path(output: Path) -> Path:
    """Where the hook leaves its ``LocalUpdate`` for a round's output folder."""
    return output.with_name(f"{output.name}.json")


def read_report(output: Path) -> LocalUpdate | None:
    p = report_path(output)
    return LocalUpdate(**json.loads(p.read_text())) if p.exists() else None


if __name__ == "__main__":
    sys.exit(main())
