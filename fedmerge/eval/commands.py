"""CLI sub-commands of the evaluator: ``eval`` (score a model) and ``report`` (tables, plots)."""

from __future__ import annotations

import argparse
import logging

log = logging.getLogger(__name__)


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("eval", help="score a model folder with lm-evaluation-harness (offline) and store the scores")
    p.add_argument("model", help="model folder (HF layout: config.json + safetensors + tokenizer)")
    p.add_argument("--config", help="eval config YAML (EvalConfig fields); flags below override it")
    p.add_argument("--tasks", nargs="+", help="task names, space- or comma-separated (local or built-in)")
    p.add_argument("--task-dir", action="append", default=None, help="folder of local task YAML + JSONL files (repeatable)")
    p.add_argument("--dataset", action="append", default=None, metavar="TASK=PATH", help="local copy of a built-in task's dataset (repeatable)")
    p.add_argument("--num-fewshot", type=int, help="few-shot examples per prompt (default 5)")
    p.add_argument("--limit", type=float, help="items per task (>=1) or fraction of the items (<1)")
    p.add_argument("--device", help="auto (default), cpu, cuda or cuda:N")
    p.add_argument("--dtype", choices=["auto", "float32", "bfloat16", "float16"], help="dtype to load the model in (default from the config: auto = bfloat16 on CUDA, float32 on CPU)")
    p.add_argument("--batch-size", help="an integer or 'auto' (default: auto on CUDA, 4 on CPU)")
    p.add_argument("--threads", type=int, help="torch CPU threads while scoring on CPU (default: torch's own)")
    p.add_argument("--seed", type=int, help="seed of few-shot sampling and of lm-eval's other generators (default 1234)")
    p.add_argument("--store", help="results store (SQLite) to append to (default results.db); 'none' to skip")
    p.add_argument("--round", type=int, help="round number to record with the scores")
    p.add_argument("--label", help="row name in reports (default: the model folder's name)")
    p.add_argument("--role", choices=["base", "parent", "merge"], default="merge", help="row group in reports")
    p.add_argument("--strategy", help="merge method that produced the model (recorded)")
    p.add_argument("--json", dest="json_out", help="also write the scores to this JSON file")
    p.set_defaults(func=_cmd_eval)

    r = subparsers.add_parser("report", help="Markdown table (paper Table IV shape) and PNG plots from a results store")
    r.add_argument("results", help="results store (SQLite file written by 'fedmerge eval' or the coordinator)")
    r.add_argument("--out", default="report", help="output folder (default ./report)")
    r.add_argument("--metric", default="acc", help="metric to report (default acc)")
    r.set_defaults(func=_cmd_report)


def _config_from_args(args: argparse.Namespace):
    from fedmerge.eval.config import EvalConfig
    from fedmerge.eval.errors import EvalConfigError

    raw: dict = {}
    if args.config:
        raw = EvalConfig.from_yaml(args.config).model_dump(exclude_unset=True)
    if args.tasks:
        raw["tasks"] = [t for item in args.tasks for t in item.split(",") if t]
    if args.task_dir:
        raw["task_dirs"] = list(raw.get("task_dirs", [])) + args.task_dir
    if args.dataset:
        ds = dict(raw.get("builtin_datasets", {}))
        for item in args.dataset:
            name, sep, path = item.partition("=")
            if not sep or not name or not path:
                raise EvalConfigError(f"--dataset {item!r}: expected TASK=PATH")
            ds[name] = path
        raw["builtin_datasets"] = ds
    for key, value in (("num_fewshot", args.num_fewshot), ("device", args.device), ("dtype", args.dtype), ("seed", args.seed),
                       ("cpu_threads", args.threads)):
        if value is not None:
            raw[key] = value
    if args.limit is not None:
        raw["limit"] = int(args.limit) if args.limit >= 1 else args.limit
    if args.batch_size is not None:
        raw["batch_size"] = args.batch_size if args.batch_size == "auto" else _int(args.batch_size, "--batch-size")
    if args.store is not None:
        raw["store"] = None if args.store.lower() == "none" else args.store
    if not raw.get("tasks"):
        raise EvalConfigError("no tasks: give --tasks NAME [NAME ...] or a --config with tasks")
    try:
        return EvalConfig.model_validate(raw)
    except Exception as exc:  # pydantic's message names the field
        raise EvalConfigError(f"invalid eval settings: {exc}") from None


def _int(text: str, flag: str) -> int:
    from fedmerge.eval.errors import EvalConfigError

    try:
        return int(text)
    except ValueError:
        raise EvalConfigError(f"{flag} {text!r}: expected an integer or 'auto'") from None


def _cmd_eval(args: argparse.Namespace) -> int:
    import json
    from pathlib import Path

    from fedmerge.checkpoints.atomic import write_text_atomic
    from fedmerge.eval.evaluator import Evaluator

    cfg = _config_from_args(args)
    ev = Evaluator(cfg)
    label = args.label or Path(args.model).resolve().name
    result = ev.evaluate(args.model, round=args.round, label=label, role=args.role, strategy=args.strategy)
    items = "all items" if cfg.limit is None else f"limit {cfg.limit}"
    log.info("%s: %d-shot, %s, seed %d", label, cfg.num_fewshot, items, cfg.seed)
    print(f"{'task':28s} {'metric':10s} {'value':>8s} {'stderr':>8s} {'n':>6s} {'version':>8s}")
    for s in result.scores:
        se = f"{s.stderr:8.4f}" if s.stderr is not None else f"{'-':>8s}"
        print(f"{s.task:28s} {s.metric:10s} {s.value:8.4f} {se} {s.n if s.n is not None else '-':>6} {s.version or '-':>8}")
    if cfg.store is not None:
        log.info("stored %d score(s) in %s (run %s)", len(result.scores), cfg.store, result.run_id)
    if args.json_out:
        write_text_atomic(Path(args.json_out), json.dumps({
            "run_id": result.run_id, "label": result.label, "round": result.round, "fingerprint": result.fingerprint,
            "seconds": result.seconds, "num_fewshot": result.num_fewshot, "limit": result.limit, "seed": result.seed,
            "scores": [s.__dict__ for s in result.scores],
        }, indent=2))
    return 0


def _cmd_report(args: argparse.Namespace) -> int:
    from fedmerge.eval.report import write_report

    files = write_report(args.results, args.out, metric=args.metric)
    print(f"wrote {files.markdown}")
    for p in files.plots:
        print(f"wrote {p}")
    return 0
