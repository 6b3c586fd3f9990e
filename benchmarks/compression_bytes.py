"""What each compressor makes a hospital send, and how close the delta it delivers stays to the true one.

On the ~1B set (``benchmarks/common.py::ensure_1b_set``: a bf16 base and a fine-tune), for each
compression spec: ``pack_delta`` of the fine-tune against the base (bf16 deltas, signed and sealed
to a coordinator, as a federation round packs them), then ``verify_package`` by the coordinator
with unpacking (every chunk opened and hashed; the unpacked folder stays encoded, as the
coordinator spools it), then every tensor decoded through ``DeltaCheckpoint`` and compared with
the true delta (fine-tune - base, float32), tensor by tensor, in bounded memory.

Reported per spec: the package's bytes on disk, its ratio to the raw bf16 delta (2 bytes per
parameter: what an uncompressed bf16 package carries before its manifest), the cosine of the
whole decoded delta with the true one (every tensor concatenated), the lowest cosine of any
matrix, and the relative L2 error; pack and verify wall seconds.

    .venv/bin/python benchmarks/compression_bytes.py                       # none, int8, int4, sparse:0.25+int4
    .venv/bin/python benchmarks/compression_bytes.py --specs int4 --set half --json out.json
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import ensure_1b_set, ensure_half_set  # noqa: E402

SPECS = ["none", "int8", "int4", "sparse:0.25+int4"]
ROWS = 1024  # rows decoded and compared at a time


def _raw_bf16_bytes(model_dir: Path) -> int:
    from fedmerge.checkpoints import CheckpointReader

    reader = CheckpointReader(model_dir)
    return sum(2 * math.prod(reader.info(n).shape) for n in reader.names())


def _compare(unpacked: Path, model_dir: Path, base_dir: Path) -> dict:
    """Cosine and relative error of the decoded delta against ``model - base``, row block by row block."""
    import torch

    from fedmerge.checkpoints import CheckpointReader
    from fedmerge.merging.taskvector import DeltaCheckpoint

    delta = DeltaCheckpoint(unpacked)
    model, base = CheckpointReader(model_dir), CheckpointReader(base_dir)
    dot = true_sq = got_sq = err_sq = 0.0
    lowest, lowest_name = 1.0, None
    for name in model.names():
        shape = model.info(name).shape
        t_dot = t_true = t_got = 0.0
        for a in range(0, shape[0], ROWS):
            rows = (a, min(shape[0], a + ROWS))
            true = model.get(name, rows=rows).to(torch.float32) - base.get(name, rows=rows).to(torch.float32)
            got = delta.get_delta(name, rows=rows).to(torch.float32) if name in delta.names() else torch.zeros_like(true)
            t_dot += float(torch.dot(true.flatten().double(), got.flatten().double()))
            t_true += float(true.double().square().sum())
            t_got += float(got.double().square().sum())
            err_sq += float((got - true).double().square().sum())
        dot, true_sq, got_sq = dot + t_dot, true_sq + t_true, got_sq + t_got
        if len(shape) == 2 and t_true > 0:
            cos = t_dot / math.sqrt(t_true * t_got) if t_got > 0 else 0.0
            if cos < lowest:
                lowest, lowest_name = cos, name
    return {
        "cosine": round(dot / math.sqrt(true_sq * got_sq), 5),
        "lowest_matrix_cosine": round(lowest, 5),
        "lowest_matrix": lowest_name,
        "relative_l2_error": round(math.sqrt(err_sq / true_sq), 5),
    }


def measure(spec: str, base: Path, ft: Path, work: Path) -> dict:
    from fedmerge.security.keys import generate_identity
    from fedmerge.security.pack import pack_delta
    from fedmerge.security.trust import TrustStore
    from fedmerge.security.verify import verify_package

    keys = work / "keys"
    hosp, coord = generate_identity("hosp", keys), generate_identity("coord", keys)
    trust = TrustStore()
    trust.add(hosp.public)
    trust.add(coord.public, role="coordinator")
    t0 = time.perf_counter()
    pkg = pack_delta(ft, base, work / "pkg", hosp, 1, seal_to=coord.public, dtype="bfloat16", compress=spec, compress_seed=1)
    pack_s = time.perf_counter() - t0
    pkg_bytes = sum(p.stat().st_size for p in pkg.rglob("*") if p.is_file())
    t0 = time.perf_counter()
    verify_package(pkg, trust, expected_round=1, opener=coord, expected_compression=spec, unpack_to=work / "unpacked")
    verify_s = time.perf_counter() - t0
    row = {"spec": spec, "package_bytes": pkg_bytes, "pack_s": round(pack_s, 1), "verify_unpack_s": round(verify_s, 1)}
    row.update(_compare(work / "unpacked", ft, base))
    shutil.rmtree(work)
    return row


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--specs", default=",".join(SPECS), help="comma-separated compression specs")
    ap.add_argument("--set", default="1b", choices=["1b", "half"], help="the 1.12 B set or its 0.63 B half")
    ap.add_argument("--json", default=None, help="also write the rows here")
    args = ap.parse_args(argv)
    base, fts = ensure_1b_set() if args.set == "1b" else ensure_half_set()
    raw = _raw_bf16_bytes(fts[0])
    rows = []
    with tempfile.TemporaryDirectory(prefix="fedmerge-compression-") as tmp:
        for i, spec in enumerate(s.strip() for s in args.specs.split(",") if s.strip()):
            row = measure(spec, base, fts[0], Path(tmp) / f"run{i}")
            row["ratio_to_raw_bf16"] = round(row["package_bytes"] / raw, 4)
            rows.append(row)
            print(json.dumps(row), flush=True)
    print(f"\nraw bf16 delta: {raw} bytes ({args.set} set)\n")
    print("| spec | package bytes | / raw bf16 | cosine | lowest matrix cosine | rel. L2 error | pack s | verify+unpack s |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['spec']} | {r['package_bytes']:,} | {r['ratio_to_raw_bf16']:.3f} | {r['cosine']:.4f} | {r['lowest_matrix_cosine']:.4f} | {r['relative_l2_error']:.4f} | {r['pack_s']} | {r['verify_unpack_s']} |")
    if args.json:
        Path(args.json).write_text(json.dumps({"set": args.set, "raw_bf16_bytes": raw, "rows": rows}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
