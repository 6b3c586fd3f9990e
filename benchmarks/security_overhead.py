"""Cost of signing, sealing and verifying a delta package, against reading the checkpoint alone;
and what a hostile package costs the verifier.

On the Mistral-shaped bf16 sets (``benchmarks/common.py``), in one run, each phase in a fresh
subprocess (so its peak RSS is its own; times exclude interpreter start and imports):

- ``read``: read every tensor of the fine-tune and of the reference (base), nothing else. The
  floor: a package cannot be made without reading both. Run twice; the first warms the page cache.
- ``pack_seal``: ``pack_delta`` (float32 delta, hashed, sealed with AES-256-GCM, signed, fsynced).
- ``verify_open``: ``verify_package`` with the coordinator key (every chunk opened, hashed and
  checked finite; nothing written).
- extras: ``pack_plain`` / ``verify_plain`` (no sealing) and ``unpack`` (verify + open + write
  the DeltaCheckpoint folder).

``--hostile`` adds what a sender can make the verifier spend before it is refused:

- ``manifest_46mib`` / ``manifest_15mib``: an unsigned (wrongly signed) but well-formed manifest
  of 46 MiB (above the 16 MiB cap) and of 15 MiB (under it), from an enrolled sender;
- ``chunks_1gib``: an enrolled sender's correctly signed package declaring 1 GiB chunks;
- ``chunks_64mib``: the same data with 64 MiB chunks, the largest allowed.

With ``--baseline REV`` every phase also runs on the fedmerge of git revision ``REV`` (exported
with ``git archive``), in the same invocation, so each figure has its before beside it.

Reported: wall seconds and their ratio to ``read``; CPU seconds (user + system, all threads)
and their ratio to ``read``'s, which the load of a shared machine does not change; GB/s; peak
RSS and its growth over the process after imports; for hostile phases, the typed error that
ended them. Target: ``pack_seal`` and ``verify_open`` each at most 1.6x ``read`` (wall).

    .venv/bin/python benchmarks/security_overhead.py [--half] [--no-extras] [--hostile] [--baseline REV] [--workers N] [--json out.json]
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
sys.path.insert(0, str(ROOT))
# A child measuring another revision imports that revision's fedmerge, not this tree's.
if os.environ.get("FEDMERGE_BENCH_CODE"):
    sys.path.insert(0, os.environ["FEDMERGE_BENCH_CODE"])

TARGET = 1.6
PHASES = ["read", "read", "pack_seal", "verify_open", "pack_plain", "verify_plain", "unpack"]
HOSTILE = ["manifest_46mib", "manifest_15mib", "chunks_1gib", "chunks_64mib"]


def _api():
    """pack_delta and verify_package of whichever fedmerge this child imported (the module split
    and ``require_sealed`` arrived together; a baseline revision may predate them)."""
    import importlib.util

    if importlib.util.find_spec("fedmerge.security.verify") is not None:
        from fedmerge.security.pack import pack_delta
        from fedmerge.security.verify import verify_package

        return pack_delta, lambda pkg, trust, **kw: verify_package(pkg, trust, require_sealed=False, **kw)
    from fedmerge.security.pack import pack_delta
    from fedmerge.security.verify import verify_package

    return pack_delta, verify_package


def _trust(work: Path):
    """An in-memory store of the two public identities (the same calls in every revision)."""
    from fedmerge.security.keys import PublicIdentity
    from fedmerge.security.trust import TrustStore

    store = TrustStore()
    store.add(PublicIdentity.load(work / "keys" / "hosp.pub.json"))
    store.add(PublicIdentity.load(work / "keys" / "coord.pub.json"), role="coordinator")
    return store


def _rss_mb() -> float:
    """Peak resident memory of this process image (VmHWM). Not ``ru_maxrss``: Linux carries that
    over ``exec`` from the forked parent, so every child would report the parent's peak."""
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024.0
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _child(args: argparse.Namespace) -> None:
    import numpy  # noqa: F401  (imported in every phase alike)

    if args.child == "read" or args.child.startswith("pack"):
        import torch  # noqa: F401  (verifying never imports torch: its RSS is the verifier's own)

    from fedmerge.checkpoints import CheckpointReader
    from fedmerge.errors import FedmergeError
    from fedmerge.security.keys import load_identity

    pack_delta, verify = _api()
    work = Path(args.work)
    code_dir = Path(args.code_work)
    out: dict = {}
    trust = _trust(work)
    coord = load_identity(work / "keys" / "coord.key")
    out["rss_before_mb"] = _rss_mb()
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
        pack_delta(args.model, args.reference, code_dir / args.child, hosp, 1, "sha256:bench", seal_to=coord.public if sealed else None, workers=args.workers)
    elif args.child in HOSTILE:
        try:
            v = verify(work / "hostile" / args.child, trust, workers=args.workers)
            out["outcome"] = f"accepted ({v.manifest.total_bytes / 1e9:.2f} GB checked)"
        except FedmergeError as exc:
            out["outcome"] = type(exc).__name__
            out["message"] = str(exc)[:300]
    else:
        pkg = code_dir / ("pack_plain" if args.child == "verify_plain" else "pack_seal")
        unpack_to = code_dir / "delta" if args.child == "unpack" else None
        v = verify(pkg, trust, expected_round=1, opener=coord, unpack_to=unpack_to, workers=args.workers)
        out["package_bytes"] = v.manifest.total_bytes
    out["seconds"] = time.perf_counter() - t0
    ru = resource.getrusage(resource.RUSAGE_SELF)
    out["cpu_seconds"] = ru.ru_utime + ru.ru_stime - cpu0
    out["peak_rss_mb"] = _rss_mb()
    print("RESULT " + json.dumps(out))


def _run_child(phase: str, args: argparse.Namespace, model: Path, reference: Path, work: Path, code: Path | None) -> dict:
    code_work = work / ("baseline-work" if code else "current-work")
    code_work.mkdir(exist_ok=True)
    cmd = [sys.executable, __file__, "--child", phase, "--model", str(model), "--reference", str(reference), "--work", str(work), "--code-work", str(code_work), "--workers", str(args.workers)]
    env = {**os.environ, "FEDMERGE_BENCH_CODE": str(code) if code else ""}
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env)
    if proc.returncode != 0:
        sys.stderr.write(proc.stderr)
        raise SystemExit(f"phase {phase} failed")
    line = next(l for l in proc.stdout.splitlines() if l.startswith("RESULT "))
    return json.loads(line[len("RESULT "):])


# -- hostile inputs -------------------------------------------------------------------------------
def _hostile_manifest(pkg: Path, target_bytes: int, sender) -> int:
    """A well-formed, canonical manifest of about ``target_bytes`` from ``sender``, signed over
    other bytes: every revision has to refuse it, the question is what it pays first."""
    import hashlib

    from fedmerge.security.manifest import MANIFEST_NAME, SIGNATURE_NAME, DeltaManifest, TensorEntry, canonical_bytes, signature_doc, signature_payload

    per = len(canonical_bytes(TensorEntry("model.layers.000000.t.weight", (8, 8), "F32", "0" * 64, "data-00000.bin", 10**7, 256, 256, 1).to_dict())) + 1
    n = max(1, target_bytes // per)
    tensors, off = [], 0
    for i in range(n):
        tensors.append(TensorEntry(f"model.layers.{i:06d}.t.weight", (8, 8), "F32", hashlib.sha256(str(i).encode()).hexdigest(), "data-00000.bin", off, 256, 256, 1))
        off += 256
    m = DeltaManifest(sender.name, 1, "sha256:bench", "0" * 32, "2024-01-01T00:00:00Z", 4 * 1024 * 1024, tuple(tensors), (("data-00000.bin", off),))
    raw = m.to_bytes()
    pkg.mkdir(parents=True)
    (pkg / MANIFEST_NAME).write_bytes(raw)
    (pkg / SIGNATURE_NAME).write_bytes(signature_doc(sender.name, sender.public.key_id, sender.sign(signature_payload("delta", b"other bytes"))))
    return len(raw)


def _rechunked(src: Path, dst: Path, chunk_bytes: int, sender) -> None:
    """``src`` (an unsealed package) declaring ``chunk_bytes`` chunks, correctly signed by ``sender``:
    unsealed data does not depend on the chunk size, so the data files are hard links."""
    from fedmerge.security.manifest import MANIFEST_NAME, SIGNATURE_NAME, canonical_bytes, chunk_count, signature_doc, signature_payload

    dst.mkdir(parents=True)
    doc = json.loads((src / MANIFEST_NAME).read_bytes())
    doc["chunk_bytes"] = chunk_bytes
    for t in doc["tensors"]:
        t["chunks"] = chunk_count(t["nbytes"], chunk_bytes)
    for f in doc["files"]:
        os.link(src / f["name"], dst / f["name"])
    raw = canonical_bytes(doc)
    (dst / MANIFEST_NAME).write_bytes(raw)
    (dst / SIGNATURE_NAME).write_bytes(signature_doc(sender.name, sender.public.key_id, sender.sign(signature_payload("delta", raw))))


def _export_revision(rev: str, dest: Path) -> Path:
    dest.mkdir(parents=True)
    archive = subprocess.run(["git", "-C", str(ROOT), "archive", rev, "fedmerge"], capture_output=True, check=True).stdout
    subprocess.run(["tar", "-x", "-C", str(dest)], input=archive, check=True)
    return dest


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--half", action="store_true", help="use the ~0.6B set (same widths, half the layers)")
    ap.add_argument("--workers", type=int, default=None, help="pipeline workers (default: fedmerge's)")
    ap.add_argument("--json", help="also write the figures to this file")
    ap.add_argument("--keep", action="store_true", help="keep the packages (in a temporary folder)")
    ap.add_argument("--no-extras", action="store_true", help="only read, pack_seal and verify_open")
    ap.add_argument("--no-overhead", action="store_true", help="skip the pack/verify phases (with --hostile: only the hostile cases)")
    ap.add_argument("--hostile", action="store_true", help="also measure hostile packages (oversized manifest, huge chunks)")
    ap.add_argument("--baseline", metavar="REV", help="also run every phase on fedmerge at this git revision")
    for hidden in ("--child", "--model", "--reference", "--work", "--code-work"):
        ap.add_argument(hidden, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.workers is None:
        args.workers = max(1, min(4, os.cpu_count() or 1))
    if args.child:
        _child(args)
        return

    from benchmarks.common import ensure_1b_set, ensure_half_set
    from fedmerge.checkpoints import CheckpointReader
    from fedmerge.security.keys import generate_identity
    from fedmerge.security.pack import pack_delta

    base, fts = (ensure_half_set if args.half else ensure_1b_set)()
    model = fts[0]
    ckpt_bytes = CheckpointReader(model).total_bytes() + CheckpointReader(base).total_bytes()
    work = Path(tempfile.mkdtemp(prefix="fedmerge-secbench-", dir=os.environ.get("FEDMERGE_BENCH_TMP")))
    try:
        hosp = generate_identity("hosp", work / "keys")
        generate_identity("coord", work / "keys")
        versions: dict[str, Path | None] = {"current": None}
        if args.baseline:
            versions = {"baseline": _export_revision(args.baseline, work / "baseline-code"), "current": None}
        phases = [] if args.no_overhead else (PHASES[:4] if args.no_extras else PHASES)
        if args.hostile:
            hostile = work / "hostile"
            print("building hostile packages...", flush=True)
            sizes = {p: _hostile_manifest(hostile / p, mib * 1024 * 1024, hosp) for p, mib in (("manifest_46mib", 46), ("manifest_15mib", 15))}
            plain = pack_delta(model, base, work / "plain-source", hosp, 1, "sha256:bench", workers=args.workers)
            _rechunked(plain, hostile / "chunks_1gib", 1 << 30, hosp)
            _rechunked(plain, hostile / "chunks_64mib", 64 << 20, hosp)
            phases = phases + HOSTILE
        results: dict[str, dict[str, dict]] = {v: {} for v in versions}
        for version, code in versions.items():
            for i, phase in enumerate(phases):
                key = "read_cold" if phase == "read" and i == 0 else phase
                results[version][key] = r = _run_child(phase, args, model, base, work, code)
                print(f"  {version:8s} {key:15s} {r['seconds']:7.2f} s {r['peak_rss_mb']:7.0f} MB {r.get('outcome', '')}", flush=True)
        print(f"\nsecurity on {model.parent.name}: model + reference {ckpt_bytes / 1e9:.2f} GB (bf16), {args.workers} workers, {os.cpu_count()} CPUs" + (f", baseline {args.baseline}" if args.baseline else ""))
        table: dict[str, dict[str, dict]] = {v: {} for v in versions}
        for version in versions:
            res = results[version]
            if "read" in res:
                floor, cpu_floor = res["read"]["seconds"], res["read"]["cpu_seconds"]
                pkg_bytes = res["verify_open"]["package_bytes"]
            print(f"\n[{version}]\n{'phase':15s} {'seconds':>8s} {'x read':>7s} {'CPU s':>7s} {'CPU x read':>10s} {'peak RSS MB':>12s} {'RSS growth MB':>14s}  outcome")
            for key, r in res.items():
                row = {"seconds": round(r["seconds"], 3), "cpu_seconds": round(r["cpu_seconds"], 3), "peak_rss_mb": round(r["peak_rss_mb"], 1), "rss_growth_mb": round(r["peak_rss_mb"] - r["rss_before_mb"], 1)}
                if "read" in res and key not in HOSTILE:
                    nbytes = ckpt_bytes if key.startswith(("read", "pack")) else pkg_bytes
                    row.update(ratio_to_read=round(r["seconds"] / floor, 3), cpu_ratio_to_read=round(r["cpu_seconds"] / cpu_floor, 3), gb_per_s=round(nbytes / r["seconds"] / 1e9, 3))
                if "outcome" in r:
                    row["outcome"] = r["outcome"]
                table[version][key] = row
                ratio = f"{row['ratio_to_read']:7.2f}" if "ratio_to_read" in row else f"{'':7s}"
                cratio = f"{row['cpu_ratio_to_read']:10.2f}" if "cpu_ratio_to_read" in row else f"{'':10s}"
                print(f"{key:15s} {row['seconds']:8.2f} {ratio} {row['cpu_seconds']:7.2f} {cratio} {row['peak_rss_mb']:12.0f} {row['rss_growth_mb']:14.0f}  {row.get('outcome', '')}")
            if "read" in res:
                for key in ("pack_seal", "verify_open"):
                    ok = table[version][key]["ratio_to_read"] <= TARGET
                    print(f"target {key} <= {TARGET}x read: {'met' if ok else 'NOT met'} ({table[version][key]['ratio_to_read']:.2f}x)")
        if args.hostile:
            print(f"\nhostile manifests: {sizes['manifest_46mib'] / 2**20:.1f} MiB and {sizes['manifest_15mib'] / 2**20:.1f} MiB")
        print(f"load average at the end: {', '.join(f'{x:.1f}' for x in os.getloadavg())} (the machine is shared; CPU seconds do not depend on the load)")
        if args.json:
            Path(args.json).write_text(json.dumps({"model": str(model), "checkpoint_bytes": ckpt_bytes, "workers": args.workers, "cpus": os.cpu_count(), "baseline": args.baseline, "phases": table}, indent=2))
    finally:
        if args.keep:
            print(f"packages kept in {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
