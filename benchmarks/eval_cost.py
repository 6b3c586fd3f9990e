"""What one evaluation round costs on this machine, and where the time goes.

For tiny Mistral models of a few sizes (random weights: speed does not depend on what the
weights mean) it scores N local MedQA-style items 5-shot through ``fedmerge.eval.Evaluator``
and reports:

* seconds per 100 items, for a round that reuses the built tasks (the coordinator's case);
* the share of that time spent outside the model's forward passes (prompt building,
  tokenization, lm-eval bookkeeping, the fingerprint of the weights), measured by timing every
  top-level forward call with hooks;
* the one-off cost of building the tasks (once per Evaluator), against lm-eval's full default
  task index, which the evaluator never builds;
* what lm-eval's run metadata would add to every round (its git probe and torch's environment
  report, which ``fedmerge.eval.lmeval`` replaces while a run lasts), against a steady round of
  the smallest model.

    python benchmarks/eval_cost.py [--items 100] [--shots 5] [--sizes 1m,10m,50m] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import tempfile
import time
from pathlib import Path

SIZES = {
    # name: (hidden, intermediate, layers, heads, kv heads)
    "1m": (128, 344, 4, 4, 2),
    "10m": (256, 688, 14, 8, 4),
    "50m": (512, 1376, 16, 8, 4),
}
DRUGS = ["aspirin", "metformin", "propranolol", "chemotherapy", "insulin", "morphine", "heparin", "amoxicillin"]
FINDINGS = ["chest pain", "fever and rash", "shortness of breath", "type two diabetes", "asthma", "a tumour"]


def items(n: int, seed: int = 0) -> list[dict]:
    rnd = random.Random(seed)
    return [
        {"id": f"q{i}", "question": f"a patient presents with {rnd.choice(FINDINGS)}. which drug is first line in case {i}?",
         "choices": rnd.sample(DRUGS, 4), "answer": rnd.randrange(4)}
        for i in range(n)
    ]


class ForwardTimer:
    """Wall time spent inside the model's top-level forward calls."""

    def __init__(self, model):
        self.seconds = 0.0
        self.calls = 0
        self._t0 = 0.0
        self._handles = [
            model.register_forward_pre_hook(self._pre),
            model.register_forward_hook(self._post),
        ]

    def _pre(self, module, args):
        self._t0 = time.perf_counter()

    def _post(self, module, args, out):
        self.seconds += time.perf_counter() - self._t0
        self.calls += 1

    def reset(self):
        self.seconds, self.calls = 0.0, 0

    def remove(self):
        for h in self._handles:
            h.remove()


def _run_metadata_cost(round_s: float) -> dict:
    """lm-eval's own git probe + environment report against fedmerge's replacements, per round."""
    import lm_eval.evaluator as lm_evaluator

    from fedmerge.eval import lmeval

    def timed(fn, *args, repeat: int = 3) -> float:
        best = float("inf")
        for _ in range(repeat):
            t0 = time.perf_counter()
            fn(*args)
            best = min(best, time.perf_counter() - t0)
        return best

    import subprocess

    def theirs() -> None:  # as lm-eval runs them, git's stderr kept off this script's output
        try:
            subprocess.check_output(["git", "describe", "--always"], stderr=subprocess.DEVNULL)
        except (subprocess.CalledProcessError, FileNotFoundError):
            pass
        lm_evaluator.add_env_info({})

    def ours() -> None:
        lmeval._quiet_git_hash()
        lmeval._light_env_info({})

    lm_s, fm_s = timed(theirs), timed(ours)
    print(f"run metadata per round: lm-eval's {lm_s:.2f} s vs fedmerge's {fm_s:.3f} s; a steady round of the smallest model "
          f"takes {round_s:.2f} s, so lm-eval's would add {100 * lm_s / round_s:.0f}% to it", flush=True)
    return {"lm_eval_s": lm_s, "fedmerge_s": fm_s, "round_s": round_s, "share_of_round": lm_s / round_s}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--items", type=int, default=100)
    ap.add_argument("--shots", type=int, default=5)
    ap.add_argument("--sizes", default="1m,10m,50m")
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--threads", type=int, default=1,
                    help="torch CPU threads (default 1: on a shared, loaded machine more threads spin against each other)")
    ap.add_argument("--json", help="also write the figures here")
    args = ap.parse_args(argv)
    from fedmerge import console

    console.setup(console.QUIET)  # the figures below are this script's only output
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["HF_DATASETS_OFFLINE"] = "1"

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from fedmerge.eval.config import EvalConfig
    from fedmerge.eval.evaluator import Evaluator
    from fedmerge.eval.tasks import write_local_task
    from fedmerge.toymodels import TinyMistralSpec, build_tiny_mistral

    torch.set_num_threads(args.threads)

    figures: dict = {"items": args.items, "shots": args.shots, "batch_size": args.batch_size, "cpus": os.cpu_count(), "threads": args.threads,
                     "load_avg_start": os.getloadavg()[0], "sizes": {}}
    with tempfile.TemporaryDirectory(prefix="fedmerge-evalcost-") as tmp:
        tmp = Path(tmp)
        write_local_task(tmp / "tasks", "bench_medqa", items(args.items), kind="medqa")
        cfg = EvalConfig(tasks=["bench_medqa"], task_dirs=[tmp / "tasks"], num_fewshot=args.shots, device="cpu",
                         batch_size=args.batch_size, store=None)

        # One-off cost: building the tasks (first time in this process includes lm-eval's imports).
        t0 = time.perf_counter()
        Evaluator(cfg).build_tasks()
        first_build = time.perf_counter() - t0
        t0 = time.perf_counter()
        Evaluator(cfg).build_tasks()
        warm_build = time.perf_counter() - t0
        from lm_eval.tasks import TaskManager

        t0 = time.perf_counter()
        TaskManager()  # lm-eval's default index of every built-in task: what the evaluator avoids
        default_index = time.perf_counter() - t0
        figures.update(build_tasks_first_s=first_build, build_tasks_again_s=warm_build, lm_eval_default_index_s=default_index)
        print(f"build tasks: first {first_build:.2f} s (imports included), again {warm_build:.2f} s; "
              f"lm-eval default task index {default_index:.2f} s (never built by the evaluator)")

        for name in [s.strip() for s in args.sizes.split(",") if s.strip()]:
            h, inter, layers, heads, kv = SIZES[name]
            spec = TinyMistralSpec(hidden_size=h, intermediate_size=inter, num_hidden_layers=layers,
                                   num_attention_heads=heads, num_key_value_heads=kv, max_position_embeddings=4096)
            folder = build_tiny_mistral(tmp / f"m{name}", spec, seed=0)
            model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32)
            tok = AutoTokenizer.from_pretrained(str(folder))
            params = sum(p.numel() for p in model.parameters())
            # The weights' fingerprint is timed on its own below; rounds here score only.
            ev = Evaluator(cfg.model_copy(update={"fingerprint": False}))
            ev.build_tasks()
            timer = ForwardTimer(model)
            rounds = []
            for r in range(2):  # round 0 warms the kernels; round 1 is the steady state
                timer.reset()
                t0 = time.perf_counter()
                res = ev.evaluate((model, tok), round=r, label=name)
                total = time.perf_counter() - t0
                rounds.append({"total_s": total, "forward_s": timer.seconds, "forward_calls": timer.calls, "acc": res.value("bench_medqa")})
            steady = rounds[-1]
            t0 = time.perf_counter()
            from fedmerge.checkpoints import state_dict_fingerprint

            state_dict_fingerprint(model.state_dict())
            fp_s = time.perf_counter() - t0
            # A round that rebuilds its tasks instead of reusing them pays the build again
            # (measured on the smallest model, where it matters most).
            rebuilt = None
            if name == args.sizes.split(",")[0].strip():
                t0 = time.perf_counter()
                Evaluator(cfg.model_copy(update={"fingerprint": False})).evaluate((model, tok), round=9, label=name)
                rebuilt = time.perf_counter() - t0
            timer.remove()
            if name == args.sizes.split(",")[0].strip():
                figures["run_metadata"] = _run_metadata_cost(steady["total_s"])
            per100 = steady["total_s"] * 100 / args.items
            outside = 1 - steady["forward_s"] / steady["total_s"]
            figures["sizes"][name] = {
                "params": params, "rounds": rounds, "seconds_per_100_items": per100,
                "forward_seconds_per_100_items": steady["forward_s"] * 100 / args.items,
                "share_outside_forward": outside, "fingerprint_s": fp_s, "round_with_rebuilt_tasks_s": rebuilt,
            }
            print(f"{name:>4s} ({params / 1e6:5.1f}M params): {per100:6.2f} s / 100 items 5-shot "
                  f"(forward {steady['forward_s'] * 100 / args.items:6.2f} s, {steady['forward_calls']} calls); "
                  f"outside forward {100 * outside:4.1f}%; fingerprint {fp_s:.2f} s"
                  + (f"; round with rebuilt tasks {rebuilt:.2f} s vs reused {steady['total_s']:.2f} s" if rebuilt else ""), flush=True)
            del model
    figures["load_avg_end"] = os.getloadavg()[0]
    print(f"load average: {figures['load_avg_start']:.1f} at start, {figures['load_avg_end']:.1f} at end, "
          f"on {figures['cpus']} CPUs; torch threads {args.threads}")
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
