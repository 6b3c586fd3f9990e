"""What federated candidate selection costs each hospital in bytes, beside the round's other transfers.

One in-process round (``fedmerge.federation.inprocess``: the real ClientApp and round loop, no
network) per candidate dtype, with K candidates, N hospitals and a model of a few million
parameters. Reported per hospital, from the round record and the replies themselves:

- ``contribution``: the delta package it sent (``delta_dtype`` of the federation, float32 here);
- ``candidates``: the K signed candidate packages it received (``selection.delta_dtype``);
- ``published``: the model folder pushed to it (what every round costs anyway);
- ``scores reply``: the JSON size of what it sent back about the candidates (its only upload);

and the ratio of one candidate package to the published model. Scores come from a constant
scorer (bytes do not depend on them).

    .venv/bin/python benchmarks/selection_bytes.py
    .venv/bin/python benchmarks/selection_bytes.py --candidates 2 --hospitals 3 --dtypes bfloat16
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))


class ConstantScorer:
    """``validation_scorer: selection_bytes:ConstantScorer``: 0.5 on every validation task."""

    def __init__(self, config):
        self.tasks = list(config.tasks)

    def __call__(self, model_dir, *, round, candidate):
        return {t: 0.5 for t in self.tasks}


def run(root: Path, hospitals: int, candidates: int, dtype: str, models) -> dict:
    import yaml

    from fedmerge.federation.inprocess import LocalGrid, bindings_of
    from fedmerge.federation.toy import build_toy_federation
    from fedmerge.protocol import SCORE_CANDIDATES, read_meta
    from fedmerge.server.config import load_federation_config
    from fedmerge.server.directory import MappingDirectory
    from fedmerge.server.rounds import RoundRunner

    tf = build_toy_federation(root, hospitals, models_from=models, part_bytes=1 << 20)
    fed = yaml.safe_load(tf.federation_config.read_text())
    alphas = [round(0.25 * (i + 1), 2) for i in range(candidates)]
    fed["selection"] = {"mode": "federated", "delta_dtype": dtype, "max_candidates": max(4, candidates),
                        "grid": {"method": "task_arithmetic", "vary": {"lambda": alphas}}}  # fmt: skip
    tf.federation_config.write_text(yaml.safe_dump(fed))
    for name, path in tf.client_configs.items():
        (path.parent / f"{name}-val.yaml").write_text(yaml.safe_dump({"tasks": [f"{name.replace('-', '_')}_val"]}))
        cfg = yaml.safe_load(path.read_text())
        cfg.update(validation=f"{name}-val.yaml", validation_scorer="selection_bytes:ConstantScorer", max_candidates=max(4, candidates))
        path.write_text(yaml.safe_dump(cfg))
    replies: dict[int, int] = {}

    class Grid(LocalGrid):
        def pull_messages(self, message_ids):
            out = super().pull_messages(message_ids)
            for r in out:
                if r.metadata.message_type == SCORE_CANDIDATES:
                    replies[r.metadata.src_node_id] = len(json.dumps(read_meta(r.content)))
            return out

    paths = [str(tf.client_configs[n]) for n in sorted(tf.client_configs)]
    grid = Grid({i + 1: p for i, p in enumerate(paths)})
    rec = RoundRunner(grid, load_federation_config(tf.federation_config), directory=MappingDirectory(bindings_of(paths))).run()[0]
    assert rec.status == "completed" and not rec.selection.fallback, rec.selection.reason
    model_bytes = rec.publication.model_bytes
    per = {}
    for i, name in enumerate(sorted(tf.client_configs)):
        per[name] = {
            "contribution": rec.contributions[name].bytes,
            "candidates": rec.selection.bytes_sent[name],
            "published": model_bytes,
            "scores_reply": replies[i + 1],
        }
    one = rec.selection.candidates[0].package_bytes
    return {"dtype": dtype, "candidates": candidates, "per_hospital": per, "candidate_package": one, "published_model": model_bytes,
            "candidate_over_model": one / model_bytes}  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--hospitals", type=int, default=3)
    ap.add_argument("--candidates", type=int, default=4)
    ap.add_argument("--dtypes", default="bfloat16,float32")
    args = ap.parse_args()

    from fedmerge.federation.toy import ToyFederation, institution_names
    from fedmerge.toymodels import TinyMistralSpec, build_tiny_mistral, perturb_checkpoint

    with tempfile.TemporaryDirectory(prefix="selection-bytes-") as tmp:
        root = Path(tmp)
        spec = TinyMistralSpec(vocab_size=512, hidden_size=256, intermediate_size=512, num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=4)
        base = build_tiny_mistral(root / "models" / "base", spec, seed=0)
        fts = {n: Path(perturb_checkpoint(base, root / "models" / n, seed=101 + i, scale=0.05)) for i, n in enumerate(institution_names(args.hospitals))}
        models = ToyFederation(root, Path(base), fts, None, {}, None, None, None)
        print(f"{args.hospitals} hospitals, {args.candidates} candidates, a model of {sum(p.stat().st_size for p in Path(base).glob('*.safetensors')) / 1e6:.1f} MB of weights")
        print(f"{'candidate dtype':<16} {'contribution':>13} {'candidates':>13} {'published':>13} {'scores reply':>13} {'1 candidate / model':>20}")
        for dtype in args.dtypes.split(","):
            out = run(root / f"fed-{dtype}", args.hospitals, args.candidates, dtype, models)
            h = next(iter(out["per_hospital"].values()))
            print(f"{dtype:<16} {h['contribution']:>13,} {h['candidates']:>13,} {h['published']:>13,} {h['scores_reply']:>13,} {out['candidate_over_model']:>20.3f}")


if __name__ == "__main__":
    main()
