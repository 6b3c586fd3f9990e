"""Cost of signing, sealing and verifying a delta package, against reading the checkpoint alone.

On the ~1B Mistral-shaped bf16 set (``benchmarks/common.py``), in one run, each phase in a fresh
subprocess (so its peak RSS is its own; times exclude interpreter start and imports):

- ``read``: read every tensor of the fine-tune and of the reference (base), nothing else. The
  floor: a package cannot be made without reading both. Run twice; the first warms the page cache.
- ``pack_seal``: ``pack_delta`` (float32 delta, hashed, sealed with AES-256-GCM, signed, fsynced).
- ``verify_open``: ``verify_package`` with the coordinator key (every chunk opened, hashed and
  checked finite; nothing written).
- extras: ``pack_plain`` / ``verify_plain`` (no sealing) and ``unpack`` (verify + open + write
  the DeltaCheckpoint folder).

Reported: wall seconds and their ratio to ``read``; CPU seconds (user + system, all threads)
and their ratio to ``read``'s, which the load of a shared machine does not change; GB/s of
checkpoint bytes (model + reference, bf16) for reading and packing, of package bytes (float32
delta) for verifying; peak RSS. Target: ``pack_seal`` and ``verify_open`` each at most 1.6x
``read`` (wall).

    .venv/bin/python benchmarks/security_overhead.py [--half] [--no-extras] [--workers N] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

TARGET = 1.6
PHASES = ["read", "read", "pack_seal", "verify_open", "pack_plain", "verify_plain", "unpack"]


def _child(args: argparse.Namespace) -> None:
    import torch  # noqa: F401  (imported in every phase alike)

    from fedmerge.checkpoints import CheckpointReader
    from fedmerge.security.keys import load_identity
    from fedmerge.security.package import pack_delta, verify_package
    from fedmerge.security.trust import TrustStore

    work = Path(args.work)
    out: dict = {}
    ru0 = resource.getrusage(resource.RUSAGE_SELF)
    cpu0 = ru0.ru_utime + ru0.ru_stime
    t0 = time.perf_counter()
    if args.child == "read":
        n = 0
        for folder in (args.model, args.reference):
            r = CheckpointReader(folder)
            for name in r.names():
                n += r.get(name).numel()
        out["elements"] = n
    elif args.child.startswith("pack"):
        sealed = args.child == "pack_seal"
        hosp = load_identity(work / "keys" / "hosp.key")
        coord = load_identity(work / "keys" / "coord.key")
        pack_delta(args.model, args.reference, work / args.child, hosp, 1, "sha256:bench", seal_to=coord.public if sealed else None, workers=args.workers)
    else:
        trust = TrustStore.load(work / "trust.json")
        coord = load_identity(work / "keys" / "coord.key")
        pkg = work / ("pack_plain" if args.child == "verify_plain" else "pack_seal")
        unpack_to = work / "delta" if args.child == "unpack" else None
        v = verify_package(pkg, trust, expected_round=1, opener=coord, unpack_to=unpack_to, workers=args.workers)
        out["package_bytes"] = v.manifest.total_bytes
    out["seconds"] = time.perf_counter() - t0
    ru = resource.getrusage(resource.RUSAGE_SELF)
    out["cpu_seconds"] = ru.ru_utime + ru.ru_stime - cpu0
    out["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
    print("RESULT " + json.dumps(out))


def _run_child(phase: str, args: argparse.Namespace, model: Path, reference: Path, work: Path) -> dict:
    cmd = [sys.executable, __file__, "--child", phase, "--model", str(model), "--reference", str(reference), "--work", str(work), "--workers", str(args.workers)]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    if proc.returncode != 0:
        sys.stderr.write(proc.stderr)
        raise SystemExit(f"phase {phase} failed")
    line = next(l for l in proc.stdout.splitlines() if l.startswith("RESULT "))
    return json.loads(line[len("RESULT "):])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--half", action="store_true", help="use the ~0.6B set (same widths, half the layers)")
    ap.add_argument("--workers", type=int, default=None, help="pipeline workers (default: fedmerge's)")
    ap.add_argument("--json", help="also write the figures to this file")
    ap.add_argument("--keep", action="store_true", help="keep the packages (in a temporary folder)")
    ap.add_argument("--no-extras", action="store_true", help="only read, pack_seal and verify_open")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--model", help=argparse.SUPPRESS)
    ap.add_argument("--reference", help=argparse.SUPPRESS)
    ap.add_argument("--work", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.workers is None:
        from fedmerge.security.pipeline import DEFAULT_WORKERS

        args.workers = DEFAULT_WORKERS
    if args.child:
        _child(args)
        return

    from benchmarks.common import ensure_1b_set, ensure_half_set
    from fedmerge.checkpoints import CheckpointReader
    from fedmerge.security.keys import generate_identity
    from fedmerge.security.trust import TrustStore

    base, fts = (ensure_half_set if args.half else ensure_1b_set)()
    model = fts[0]
    ckpt_bytes = CheckpointReader(model).total_bytes() + CheckpointReader(base).total_bytes()
    work = Path(tempfile.mkdtemp(prefix="fedmerge-secbench-", dir=os.environ.get("FEDMERGE_BENCH_TMP")))
    try:
        hosp = generate_identity("hosp", work / "keys")
        coord = generate_identity("coord", work / "keys")
        trust = TrustStore(path=work / "trust.json")
        trust.add(hosp.public)
        trust.add(coord.public, role="coordinator")
        trust.save()
        results: dict[str, dict] = {}
        phases = PHASES[:4] if args.no_extras else PHASES
        for i, phase in enumerate(phases):
            key = "read_cold" if phase == "read" and i == 0 else phase
            results[key] = _run_child(phase, args, model, base, work)
            print(f"  {key:13s} {results[key]['seconds']:7.2f} s", flush=True)
        pkg_bytes = results["verify_open"]["package_bytes"]
        floor = results["read"]["seconds"]
        print(f"\nsecurity overhead on {model.parent.name}: model + reference {ckpt_bytes / 1e9:.2f} GB (bf16), float32 delta {pkg_bytes / 1e9:.2f} GB, {args.workers} workers, {os.cpu_count()} CPUs")
        cpu_floor = results["read"]["cpu_seconds"]
        print(f"{'phase':14s} {'seconds':>8s} {'x read':>7s} {'GB/s':>7s} {'CPU s':>7s} {'CPU x read':>10s} {'peak RSS MB':>12s}")
        table = {}
        for key, r in results.items():
            nbytes = ckpt_bytes if key.startswith(("read", "pack")) else pkg_bytes
            row = {
                "seconds": round(r["seconds"], 3),
                "ratio_to_read": round(r["seconds"] / floor, 3),
                "gb_per_s": round(nbytes / r["seconds"] / 1e9, 3),
                "cpu_seconds": round(r["cpu_seconds"], 3),
                "cpu_ratio_to_read": round(r["cpu_seconds"] / cpu_floor, 3),
                "peak_rss_mb": round(r["peak_rss_mb"], 1),
            }
            table[key] = row
            print(f"{key:14s} {row['seconds']:8.2f} {row['ratio_to_read']:7.2f} {row['gb_per_s']:7.2f} {row['cpu_seconds']:7.2f} {row['cpu_ratio_to_read']:10.2f} {row['peak_rss_mb']:12.0f}")
        print(f"load average at the end: {', '.join(f'{x:.1f}' for x in os.getloadavg())} (the machine is shared; CPU seconds do not depend on the load)")
        for key in ("pack_seal", "verify_open"):
            ok = table[key]["ratio_to_read"] <= TARGET
            print(f"target {key} <= {TARGET}x read: {'met' if ok else 'NOT met'} ({table[key]['ratio_to_read']:.2f}x)")
        if args.json:
            Path(args.json).write_text(json.dumps({"model": str(model), "checkpoint_bytes": ckpt_bytes, "package_bytes": pkg_bytes, "workers": args.workers, "cpus": os.cpu_count(), "phases": table}, indent=2))
    finally:
        if args.keep:
            print(f"packages kept in {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
