"""CLI sub-commands of the merge library: ``merge``, ``inspect``, ``strategies``."""

from __future__ import annotations

import argparse
import logging
import signal
import threading
from contextlib import contextmanager
from typing import Iterator

log = logging.getLogger(__name__)


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "strategies",
        help="list the merge methods, their parameters and defaults",
        description="Every registered merge method with its paper, its global parameters and its per-model parameters, each with its default.",
    )
    p.set_defaults(func=_cmd_strategies)

    p = subparsers.add_parser(
        "merge",
        help="merge models, LoRA adapters or deltas from a YAML config (fedmerge or mergekit format)",
        description=(
            "Merge the inputs of CONFIG into a new Hugging Face folder OUTPUT_DIR, streaming tensor by tensor. "
            "A CONFIG of several YAML documents (mergekit-multi) runs each in dependency order: the unnamed one "
            "into OUTPUT_DIR, named ones into the intermediate folder (or into OUTPUT_DIR/NAME when all are named)."
        ),
    )
    p.add_argument("config", metavar="CONFIG", help="YAML merge config (fedmerge format with 'method:', or mergekit's with 'merge_method:')")
    p.add_argument("output_dir", metavar="OUTPUT_DIR", help="folder to create (written atomically)")
    p.add_argument("--device", default=None, help="auto, cpu, cuda or cuda:N (overrides the config)")
    p.add_argument(
        "--shard-size",
        default=None,
        help="largest output shard in bytes: 5B (five billion, mergekit's notation), 500M, 2GB, 1.5GiB or a byte count (overrides the config)",
    )
    p.add_argument("--seed", type=int, default=None, help="seed for the methods' random choices (overrides the config)")
    p.add_argument("--out-dtype", default=None, help="dtype to write: float32, bfloat16, float16 (default: the config's, else the base's)")
    p.add_argument("--intermediate-dir", default=None, help="where named documents of a multi-document CONFIG are written (default: OUTPUT_DIR-intermediates)")
    p.add_argument("--overwrite", action="store_true", help="replace OUTPUT_DIR (and intermediate outputs made from another recipe) if they exist")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=_cmd_merge)

    p = subparsers.add_parser(
        "inspect",
        help="check that models can be merged and how well (cosine, sign conflicts, norms, head alignment, NaN/inf)",
        description=(
            "Compatibility and per-layer mergeability of MODEL... (full models, LoRA adapters or delta folders) against BASE. "
            "Exits 1 when an input is incompatible or holds NaN or infinite weights."
        ),
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


def human_bytes(n: float) -> str:
    """1536 -> '1.5 KiB': sizes in the unit that keeps them readable."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


class Terminated(BaseException):
    """SIGTERM arrived: unwinds the merge like an interrupt, so its partial folder is removed."""


@contextmanager
def _sigterm_unwinds() -> Iterator[None]:
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum, frame):
        raise Terminated()

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _apply_overrides(plan, args: argparse.Namespace) -> None:
    from pydantic import ValidationError

    from fedmerge.merging.engine import MergeSpec
    from fedmerge.merging.mergeconfig import MergeConfigError, parse_size

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
        try:
            plan.spec = MergeSpec(**{**plan.spec.model_dump(), **updates})
        except ValidationError as exc:
            raise MergeConfigError("options: " + "; ".join(f"--{'-'.join(str(x) for x in e['loc'])}: {e['msg']}" for e in exc.errors())) from None


def _cmd_merge(args: argparse.Namespace) -> int:
    import sys

    from fedmerge.merging.mergeconfig import MergeConfigError
    from fedmerge.merging.multimerge import load_documents, reusable, run_document

    docs = load_documents(args.config, args.output_dir, args.intermediate_dir)
    for doc in docs:
        _apply_overrides(doc.plan, args)
    progress = not args.no_progress and not getattr(args, "quiet", False)
    for doc in docs:  # refuse before any document runs, not after the intermediate ones
        if doc.out_dir.exists() and not args.overwrite:
            if doc.name is None:
                raise MergeConfigError(f"{doc.out_dir}: already exists; choose another output folder or pass --overwrite")
            if not reusable(doc):
                raise MergeConfigError(f"{args.config}: {doc.name}: {doc.out_dir} exists but was made from another recipe; pass --overwrite to replace it")
    try:
        with _sigterm_unwinds():
            for doc in docs:
                if doc.name is not None and doc.out_dir.exists() and not args.overwrite:
                    print(f"{doc.name}: {doc.out_dir} already holds this merge; reused")
                    continue
                result = run_document(doc, progress=progress, overwrite=args.overwrite)
                label = f"{doc.name}: " if doc.name else ""
                models = len(result.metadata.get("inputs") or []) + len(result.metadata.get("references") or [])
                print(
                    f"{label}merged {models} inputs with {result.method} into {result.out_dir} "
                    f"({result.tensors} tensors, {human_bytes(result.bytes_written)}, {result.seconds:.1f} s)"
                )
    except Terminated:
        print(f"fedmerge merge: terminated by SIGTERM; the partial output was removed, {args.output_dir} was not written", file=sys.stderr)
        return 128 + signal.SIGTERM
    return 0


def _cmd_inspect(args: argparse.Namespace) -> int:
    from fedmerge.merging.inspect import format_report, inspect_models, report_json

    progress = not args.no_progress and not args.json and not getattr(args, "quiet", False)
    report = inspect_models(args.base, args.models, progress=progress, alignment=not args.no_alignment)
    print(report_json(report) if args.json else format_report(report))
    return 0 if report["compatible"] else 1
