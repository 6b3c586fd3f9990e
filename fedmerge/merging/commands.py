"""CLI sub-commands of the merge library: ``merge``, ``inspect``, ``strategies``."""

from __future__ import annotations

import argparse


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("strategies", help="list the merge methods and their parameters")
    p.set_defaults(func=_cmd_strategies)

    p = subparsers.add_parser(
        "merge",
        help="merge models, LoRA adapters or deltas from a YAML config (fedmerge or mergekit format)",
        description="Merge the inputs of CONFIG into a new Hugging Face folder OUTPUT_DIR, streaming tensor by tensor.",
    )
    p.add_argument("config", metavar="CONFIG", help="YAML merge config (fedmerge format with 'method:', or mergekit's with 'merge_method:')")
    p.add_argument("output_dir", metavar="OUTPUT_DIR", help="folder to create (written atomically)")
    p.add_argument("--device", default=None, help="auto, cpu, cuda or cuda:N (overrides the config)")
    p.add_argument("--shard-size", default=None, help="largest output shard, e.g. 2GB or 500MB (overrides the config)")
    p.add_argument("--seed", type=int, default=None, help="seed for the methods' random choices (overrides the config)")
    p.add_argument("--out-dtype", default=None, help="dtype to write: float32, bfloat16, float16 (default: the base's)")
    p.add_argument("--overwrite", action="store_true", help="replace OUTPUT_DIR if it exists")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=_cmd_merge)

    p = subparsers.add_parser(
        "inspect",
        help="check that models can be merged and how well (cosine, sign conflicts, norms, head alignment)",
        description="Compatibility and per-layer mergeability of MODEL... (full models, LoRA adapters or delta folders) against BASE.",
    )
    p.add_argument("base", metavar="BASE", help="the shared base model folder")
    p.add_argument("models", metavar="MODEL", nargs="+", help="models, LoRA adapters or delta folders")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.add_argument("--no-alignment", action="store_true", help="skip the head-alignment figures")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=_cmd_inspect)


def _cmd_strategies(args: argparse.Namespace) -> int:
    from fedmerge.merging.strategies import available, describe, plugin_errors

    def yaml_value(v) -> str:  # defaults as a config would spell them
        return {True: "true", False: "false", None: "null"}[v] if v is None or isinstance(v, bool) else str(v)

    def fmt(params) -> str:
        return ", ".join(p.name + ("" if p.required else f"={yaml_value(p.default)}") for p in params) or "-"

    for name in available():
        info = describe(name)
        models = f"{info.min_models}" + (f"-{info.max_models}" if info.max_models else "+")
        print(f"{name:18s} {info.summary}")
        print(f"{'':18s}   parameters: {fmt(info.parameters)}")
        print(f"{'':18s}   per model: {fmt(info.per_model)}; models: {models}{'; needs a base' if info.needs_base else ''}")
        print(f"{'':18s}   paper: {info.paper}" + ("" if info.origin == "fedmerge" else f"; from {info.origin}"))
    for name, why in plugin_errors().items():
        print(f"{name:18s} (not loaded) {why}")
    return 0


def _cmd_merge(args: argparse.Namespace) -> int:
    from fedmerge.merging.mergeconfig import MergeConfigError, load_merge_config, parse_size, run_merge_plan

    plan = load_merge_config(args.config)
    updates = {}
    if args.device is not None:
        updates["device"] = args.device
    if args.seed is not None:
        updates["seed"] = args.seed
    if args.out_dtype is not None:
        updates["out_dtype"] = args.out_dtype
    if args.shard_size is not None:
        try:
            updates["max_shard_bytes"] = parse_size(args.shard_size)
        except ValueError as exc:
            raise MergeConfigError(f"--shard-size: {exc}") from None
    if updates:
        from pydantic import ValidationError

        from fedmerge.merging.engine import MergeSpec

        try:
            plan.spec = MergeSpec(**{**plan.spec.model_dump(), **updates})
        except ValidationError as exc:
            raise MergeConfigError("options: " + "; ".join(f"--{'-'.join(str(x) for x in e['loc'])}: {e['msg']}" for e in exc.errors())) from None
    result = run_merge_plan(plan, args.output_dir, progress=not args.no_progress, overwrite=args.overwrite)
    print(f"merged {len(plan.inputs)} inputs with {result.method} into {result.out_dir} ({result.tensors} tensors, {result.bytes_written / 1e9:.2f} GB, {result.seconds:.1f} s)")
    return 0


def _cmd_inspect(args: argparse.Namespace) -> int:
    from fedmerge.merging.inspect import format_report, inspect_models, report_json

    report = inspect_models(args.base, args.models, progress=not args.no_progress and not args.json, alignment=not args.no_alignment)
    print(report_json(report) if args.json else format_report(report))
    return 0 if report["compatible"] else 1
