"""Multi-round merging with local training and selection on validation data, on demo worlds.

The federation's arithmetic without its transport, to find which strategy, candidate grid,
number of rounds and local-training budget make a published model that beats the best hospital:

- round 1 merges the hospitals' fine-tunes (task vectors against the base);
- before each later round every hospital trains the current global model for ``--steps`` steps on
  its own text (``fedmerge.demo.localtrain``, the demo's train hook), and the round merges
  ``trained - global`` (``reference: global``);
- each round builds the candidate merges of the grid, each hospital scores every candidate on its
  private validation split (its own specialty and general medicine), and the candidate that is
  best by the rule (``mean`` or ``worst`` institution) becomes the next global model.

Test exams are scored for every candidate only to show how good the choice was (what the oracle
would have picked); they never influence a choice. Worlds are built (and cached) as ``fedmerge
demo`` builds them.

    PYTHONPATH=$PWD .venv/bin/python benchmarks/demo_rounds.py --seeds 0,1,2 --grid iso_c --rounds 3 --steps 40 --rule worst
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

# Candidate grids (K <= 4): name -> [(label, method, parameters)]
GRIDS: dict[str, list[tuple[str, str, dict]]] = {
    "iso_c": [("iso_c a=0.5", "iso_c", {"alpha": 0.5}), ("iso_c a=0.75", "iso_c", {"alpha": 0.75}),
              ("iso_c a=1.0", "iso_c", {"alpha": 1.0}), ("iso_c a=1.25", "iso_c", {"alpha": 1.25})],
    "iso_c3": [("iso_c a=0.75", "iso_c", {"alpha": 0.75}), ("iso_c a=1.0", "iso_c", {"alpha": 1.0}),
               ("iso_c a=1.25", "iso_c", {"alpha": 1.25})],
    "mixed": [("iso_c a=0.75", "iso_c", {"alpha": 0.75}), ("iso_c a=1.0", "iso_c", {"alpha": 1.0}),
              ("ties d=1.0", "ties", {"density": 1.0}), ("task_arithmetic w=0.5", "task_arithmetic", {"weight": 0.5})],
    "ta": [("task_arithmetic w=0.33", "task_arithmetic", {"weight": 0.33}), ("task_arithmetic w=0.5", "task_arithmetic", {"weight": 0.5}),
           ("task_arithmetic w=0.75", "task_arithmetic", {"weight": 0.75}), ("task_arithmetic w=1.0", "task_arithmetic", {"weight": 1.0})],
    "ties": [("ties d=1.0 w=0.5", "ties", {"density": 1.0, "weight": 0.5}), ("ties d=1.0 w=0.75", "ties", {"density": 1.0, "weight": 0.75}),
             ("ties d=1.0 w=1.0", "ties", {"density": 1.0, "weight": 1.0}), ("iso_c a=0.75", "iso_c", {"alpha": 0.75})],
}


def choose(table: dict[str, dict[str, dict[str, float]]], rule: str) -> tuple[int, list[float]]:
    """table[candidate][institution][task] -> (index of the chosen candidate, its rule scores)."""
    scores = []
    for per_inst in table.values():
        means = [sum(t.values()) / len(t) for t in per_inst.values()]
        scores.append(min(means) if rule == "worst" else sum(means) / len(means))
    best = max(range(len(scores)), key=lambda i: (scores[i], -i))
    return best, scores


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", default="0", help="world seeds, comma-separated")
    ap.add_argument("--grid", default="iso_c", choices=sorted(GRIDS))
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=40, help="local training steps per hospital between rounds")
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--rule", default="worst", choices=["mean", "worst"])
    ap.add_argument("--general-share", action="store_true", help="each hospital's text also holds its own share of the general-medicine documents")
    ap.add_argument("--config", default=None, help="demo YAML whose world section is used (default: the built-in demo)")
    ap.add_argument("--cache", default=None)
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)

    from fedmerge import console

    console.setup(console.QUIET)
    import torch

    from fedmerge.demo.config import load_demo_config
    from fedmerge.demo.localtrain import train_from
    from fedmerge.demo.training import TrainSettings
    from fedmerge.demo.world import ensure_world, write_validation_config
    from fedmerge.eval.config import EvalConfig
    from fedmerge.eval.evaluator import Evaluator
    from fedmerge.merging.engine import MergeSpec, merge

    config = load_demo_config(args.config)
    torch.set_num_threads(config.world.threads)
    grid = GRIDS[args.grid]
    local = TrainSettings(steps=args.steps, lr=args.lr, batch_size=16, block_size=config.world.finetune.block_size, warmup_steps=5)
    out_rows = []
    for seed in [int(s) for s in args.seeds.split(",")]:
        wcfg = config.world.model_copy(update={"seed": seed})
        t0 = time.perf_counter()
        world, built = ensure_world(wcfg, args.cache, say=lambda m: print(m, file=sys.stderr))
        print(f"# seed {seed}: world {'built' if built else 'cached'} in {time.perf_counter() - t0:.0f} s", flush=True)
        work = Path(tempfile.mkdtemp(prefix="fedmerge-rounds-"))
        try:
            ev = config.evaluation
            test = Evaluator(EvalConfig(tasks=world.task_names, task_dirs=[world.tasks_dir], num_fewshot=ev.num_fewshot, device="cpu",
                                        dtype="float32", batch_size=ev.batch_size, seed=ev.seed, store=None, bootstrap_iters=0), store=None)
            val = {s: Evaluator(EvalConfig.from_yaml(write_validation_config(world, s, work / f"val-{s}.yaml", num_fewshot=ev.num_fewshot,
                                                                             batch_size=ev.batch_size, seed=ev.seed)), store=None)
                   for s in world.hospitals}

            def test_scores(folder: Path) -> dict[str, float]:
                return test.evaluate(str(folder), label="x").accuracies()

            parents = {s: test_scores(p) for s, p in world.hospitals.items()}
            best_parent = max(sum(a.values()) / len(a) for a in parents.values())
            print(f"  best hospital mean {100 * best_parent:.1f}", flush=True)
            reference, inputs = world.base, dict(world.hospitals)
            for r in range(1, args.rounds + 1):
                t = time.perf_counter()
                if r > 1:
                    inputs = {}
                    for i, s in enumerate(world.hospitals):
                        dest = work / f"r{r}-{s}"
                        train_from(reference, world.hospital_text(s, args.general_share), dest, local, seed=seed + 100 + i + r)
                        inputs[s] = dest
                t_train = time.perf_counter() - t
                table, tests, folders = {}, {}, []
                for label, method, params in grid:
                    folder = work / f"r{r}-{label.replace(' ', '_')}"
                    merge(reference, list(inputs.values()), folder, MergeSpec(method=method, parameters=params, seed=0, device="cpu"), progress=False)
                    table[label] = {s: val[s].evaluate(str(folder), label=label).accuracies() for s in world.hospitals}
                    tests[label] = test_scores(folder)
                    folders.append(folder)
                pick, rule_scores = choose(table, args.rule)
                for k, (label, _, _) in enumerate(grid):
                    acc = tests[label]
                    mean = sum(acc.values()) / len(acc)
                    print(f"  r{r} {label:24s} val {100 * rule_scores[k]:5.1f}  test mean {100 * mean:5.1f} (gain {100 * (mean - best_parent):+5.1f})  "
                          + " ".join(f"{t.removeprefix('demo_')[:4]} {100 * v:5.1f}" for t, v in acc.items()) + ("  <= chosen" if k == pick else ""), flush=True)
                    out_rows.append({"seed": seed, "round": r, "label": label, "chosen": k == pick, "rule_score": rule_scores[k], "test": acc,
                                     "validation": table[label], "best_parent": best_parent, "grid": args.grid, "steps": args.steps, "rule": args.rule})
                print(f"  r{r}: local training {t_train:.0f} s, merges+scores {time.perf_counter() - t - t_train:.0f} s", flush=True)
                reference = folders[pick]
        finally:
            shutil.rmtree(work, ignore_errors=True)
    if args.json:
        Path(args.json).write_text(json.dumps(out_rows, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
