"""Merge throughput and memory: every strategy on the ~1B Mistral-shaped bf16 set, against the I/O floor.

In one run, each measurement in a fresh subprocess (so peak RSS is its own):

- ``baseline``: import torch and fedmerge, nothing else (the RSS every run starts from);
- ``io_floor``: read the base and both fine-tunes tensor by tensor and write one output folder
  with the same writer, no arithmetic: the least any merge must cost;
- one run per strategy: ``fedmerge.merging.engine.merge`` with default parameters (plus
  density/t where a method needs one), default compute dtype float32, output bf16.

Reported: wall seconds, GB/s ((bytes read + bytes written) / wall), peak RSS (``ru_maxrss``),
and ratios: each strategy against the floor and against task_arithmetic. ``--half`` adds the
same widths with half the layers, to show peak RSS does not grow with model size.

    .venv/bin/python benchmarks/merge_throughput.py [--half] [--only ties,task_arithmetic] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

# Parameters a method needs to do real work; only those the method declares are passed.
METHOD_PARAMS = {"density": 0.5, "t": 0.5, "epsilon": 0.1, "gamma": 0.01}
# Methods compared against task_arithmetic with a target ratio.
TARGETS = {"task_arithmetic": ("io_floor", 1.5), "ties": ("task_arithmetic", 3.0), "hierarchical": ("task_arithmetic", 1.3)}


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux: KiB


def _child(args: argparse.Namespace) -> None:
    import torch  # noqa: F401  (counted in every run alike)

    import fedmerge.merging.engine  # noqa: F401
    from fedmerge.checkpoints import CheckpointReader, CheckpointWriter

    inputs = [Path(p) for p in args.inputs]
    base = Path(args.base)
    out = Path(args.out)
    ru0 = resource.getrusage(resource.RUSAGE_SELF)
    cpu0 = ru0.ru_utime + ru0.ru_stime
    t0 = time.perf_counter()
    read = written = 0
    if args.child == "baseline":
        pass
    elif args.child == "io_floor":
        import hashlib

        from fedmerge.checkpoints import tensor_bytes

        readers = [CheckpointReader(p) for p in [base, *inputs]]
        with CheckpointWriter(out, max_shard_bytes=2 * 1024**3) as w:
            w.plan([readers[0].info(n) for n in readers[0].names()])
            for n in readers[0].names():
                ts = [r.get(n) for r in readers]
                if not args.no_fingerprints:  # a merge hashes every input tensor for its fingerprints
                    for t in ts:
                        hashlib.sha256(tensor_bytes(t)).digest()
                read += sum(t.numel() * t.element_size() for t in ts)
                w.add(n, ts[-1])
                del ts
            w.commit(sidecars_from=base)
            written = w.bytes_written
    else:
        from fedmerge.merging.engine import MergeSpec, merge
        from fedmerge.merging.strategies import get_strategy_class

        # "method@serial": the same merge with its inputs loaded one after another, for comparison.
        method, _, variant = args.child.partition("@")
        cls = get_strategy_class(method)
        fields = set(cls.Params.model_fields) | set(cls.PerModel.model_fields)
        params = {k: v for k, v in METHOD_PARAMS.items() if k in fields}
        spec = MergeSpec(method=method, parameters=params, device=args.device, fingerprints=not args.no_fingerprints, read_workers=1 if variant == "serial" else None)
        base_arg = base if cls.needs_base else None
        ins = [str(p) for p in inputs] if cls.needs_base else [str(base), *map(str, inputs)][: (cls.max_models or 3)]
        result = merge(base_arg, ins, out, spec, progress=False)
        read = sum(CheckpointReader(p).total_bytes() for p in ([base, *inputs] if cls.needs_base else map(Path, ins)))
        written = result.bytes_written
    seconds = time.perf_counter() - t0
    ru = resource.getrusage(resource.RUSAGE_SELF)
    # CPU seconds of every thread: steadier than wall time when the machine is shared.
    cpu = ru.ru_utime + ru.ru_stime - cpu0
    print(json.dumps({"run": args.child, "seconds": seconds, "cpu_seconds": cpu, "read_bytes": read, "written_bytes": written, "peak_rss_mb": _rss_mb()}))


def _run_child(kind: str, base: Path, fts: list[Path], out: Path, device: str, extra: tuple[str, ...] = ()) -> dict:
    if out.exists():
        shutil.rmtree(out)
    cmd = [sys.executable, __file__, "--child", kind, "--base", str(base), "--out", str(out), "--device", device, *extra, "--inputs", *map(str, fts)]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    shutil.rmtree(out, ignore_errors=True)
    if proc.returncode != 0:
        return {"run": kind, "error": (proc.stderr.strip().splitlines() or ["?"])[-1]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def run_set(label: str, base: Path, fts: list[Path], methods: list[str], device: str, out_root: Path, extra: tuple[str, ...] = ()) -> dict:
    from benchmarks.common import warm_page_cache

    rows = []
    for kind in ["baseline", "io_floor", *methods]:
        warm_page_cache([base, *fts])
        r = _run_child(kind, base, fts, out_root / f"{label}-{kind}", device, extra)
        if "seconds" in r and r["seconds"] > 0:
            r["gb_per_s"] = (r["read_bytes"] + r["written_bytes"]) / r["seconds"] / 1e9
        rows.append(r)
        print(_fmt_row(label, r), flush=True)
    by = {r["run"]: r for r in rows}
    floor = by.get("io_floor", {}).get("seconds")
    ta = by.get("task_arithmetic", {}).get("seconds")
    floor_cpu = by.get("io_floor", {}).get("cpu_seconds")
    ta_cpu = by.get("task_arithmetic", {}).get("cpu_seconds")
    for r in rows:
        if r.get("seconds") and r["run"] not in ("baseline", "io_floor"):
            r["x_io_floor"] = r["seconds"] / floor if floor else None
            r["x_task_arithmetic"] = r["seconds"] / ta if ta else None
            r["cpu_x_io_floor"] = r["cpu_seconds"] / floor_cpu if floor_cpu else None
            r["cpu_x_task_arithmetic"] = r["cpu_seconds"] / ta_cpu if ta_cpu else None
    return {"set": label, "base": str(base), "runs": rows}


def _fmt_row(label: str, r: dict) -> str:
    if "error" in r:
        return f"{label:5s} {r['run']:18s} ERROR {r['error']}"
    gbs = f"{r['gb_per_s']:.2f}" if "gb_per_s" in r else "-"
    return f"{label:5s} {r['run']:18s} {r['seconds']:8.1f} s {gbs:>7s} GB/s {r['peak_rss_mb']:8.0f} MB {r.get('cpu_seconds', 0):8.1f} s cpu"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--base", help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    ap.add_argument("--inputs", nargs="*", help=argparse.SUPPRESS)
    ap.add_argument("--device", default="cpu", help="cpu (default), cuda or auto")
    ap.add_argument("--only", default=None, help="comma-separated strategies (default: every registered one); NAME@serial loads the inputs one after another")
    ap.add_argument("--half", action="store_true", help="also run the half-size set (same widths, half the layers)")
    ap.add_argument("--half-only", default=None, help="comma-separated strategies to run on the half-size set (default: the same as on the 1B set)")
    ap.add_argument("--sets", default="1b", help="which sets: 1b, half, widths (the 1B set's shapes, two layers), comma-separated")
    ap.add_argument("--json", default=None, help="write the results here (default: benchmarks/results/merge_throughput.json)")
    ap.add_argument("--cache-dir", default=None)
    ap.add_argument("--no-fingerprints", action="store_true", help="merge without hashing the inputs (MergeSpec.fingerprints=False)")
    args = ap.parse_args(argv)
    if args.child:
        _child(args)
        return 0

    from benchmarks.common import cache_root, ensure_1b_set, ensure_half_set, ensure_widths_set
    from fedmerge.merging.strategies import available

    methods = args.only.split(",") if args.only else list(available())
    if "task_arithmetic" in methods:  # the reference for the ratios runs first
        methods.remove("task_arithmetic")
        methods.insert(0, "task_arithmetic")
    out_root = cache_root(args.cache_dir) / "throughput-out"
    out_root.mkdir(parents=True, exist_ok=True)
    wanted = set(args.sets.split(",")) | ({"half"} if args.half else set())
    sets = []
    if "1b" in wanted:
        sets.append(("1b", *ensure_1b_set(args.cache_dir), methods))
    if "half" in wanted:
        half_methods = args.half_only.split(",") if args.half_only else methods
        sets.append(("half", *ensure_half_set(args.cache_dir), half_methods))
    if "widths" in wanted:
        sets.append(("widths", *ensure_widths_set(args.cache_dir), methods))
    results = {"machine": {"cpus": os.cpu_count(), "device": args.device, "load_avg_at_start": os.getloadavg()}, "fingerprints": not args.no_fingerprints, "targets": TARGETS, "sets": []}
    print(f"{'set':5s} {'run':18s} {'wall':>10s} {'GB/s':>12s} {'peak RSS':>11s} {'CPU':>12s}")
    for label, base, fts, ms in sets:
        extra = ("--no-fingerprints",) if args.no_fingerprints else ()
        results["sets"].append(run_set(label, base, fts, ms, args.device, out_root, extra))
    print()
    print(f"{'set':5s} {'run':18s} {'x I/O floor':>12s} {'x task_arith':>13s} {'cpu x floor':>12s} {'cpu x TA':>9s} {'target':>22s}")
    for s in results["sets"]:
        for r in s["runs"]:
            if "x_io_floor" in r:
                tgt = TARGETS.get(r["run"])
                t = f"<= {tgt[1]}x {tgt[0]}" if tgt else ""
                print(
                    f"{s['set']:5s} {r['run']:18s} {r['x_io_floor'] or 0:12.2f} {r['x_task_arithmetic'] or 0:13.2f} "
                    f"{r.get('cpu_x_io_floor') or 0:12.2f} {r.get('cpu_x_task_arithmetic') or 0:9.2f} {t:>22s}"
                )
    from benchmarks.common import write_results

    write_results(results, args.json, "merge_throughput")
    return 0


if __name__ == "__main__":
    sys.exit(main())
