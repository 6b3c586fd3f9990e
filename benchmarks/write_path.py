"""Writing a model-sized file: through the page cache against around it (``SequentialFile``).

Both ways write the same bytes from a buffer of tensor-sized pieces and fsync, alternately,
``--repeats`` times, each into a fresh file that is removed afterwards; reported per way: wall
seconds (write and fsync), CPU seconds (user + system of this process) and the ratio.

    .venv/bin/python benchmarks/write_path.py [--gib 2.1] [--repeats 3] [--dir DIR] [--json out.json]
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from fedmerge.checkpoints.direct_file import SequentialFile  # noqa: E402

PIECE = 23 * 1024 * 1024  # about one bf16 MLP matrix of the 1.12 B set


def _cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def _page_cache(path: Path, data: memoryview, pieces: int) -> None:
    with open(path, "wb") as fh:
        for _ in range(pieces):
            fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())


def _direct(path: Path, data: memoryview, pieces: int) -> None:
    f = SequentialFile(path, direct=True)
    for _ in range(pieces):
        f.write(data)
    f.close(durable=True)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--gib", type=float, default=2.1, help="size of each file written (GiB)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--dir", default=None, help="where to write (default: the system's temporary folder)")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    data = memoryview(os.urandom(PIECE))
    pieces = max(1, int(args.gib * 1024**3 // PIECE))
    runs: dict[str, list[dict]] = {"page_cache": [], "direct": []}
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        probe = SequentialFile(Path(tmp) / "probe")
        direct_ok = probe.direct
        probe.close(durable=False)
        print(f"{pieces * PIECE / 1024**3:.2f} GiB per file in {tmp}; O_DIRECT {'taken' if direct_ok else 'not offered: both ways use the page cache'}")
        for rep in range(args.repeats):
            for way, fn in (("page_cache", _page_cache), ("direct", _direct)):
                path = Path(tmp) / f"{way}-{rep}.bin"
                c0, t0 = _cpu(), time.perf_counter()
                fn(path, data, pieces)
                r = {"seconds": time.perf_counter() - t0, "cpu_seconds": _cpu() - c0}
                path.unlink()
                runs[way].append(r)
                print(f"{way:10s} run {rep}: {r['seconds']:6.2f} s wall {r['cpu_seconds']:6.2f} CPU s")
    med = {w: {k: statistics.median(r[k] for r in rs) for k in ("seconds", "cpu_seconds")} for w, rs in runs.items()}
    speed = med["page_cache"]["seconds"] / med["direct"]["seconds"]
    cpu = med["page_cache"]["cpu_seconds"] / max(med["direct"]["cpu_seconds"], 1e-9)
    print(f"median: page cache {med['page_cache']['seconds']:.2f} s ({med['page_cache']['cpu_seconds']:.2f} CPU s), "
          f"direct {med['direct']['seconds']:.2f} s ({med['direct']['cpu_seconds']:.2f} CPU s): {speed:.2f}x faster, {cpu:.1f}x less CPU")
    from benchmarks.common import write_results

    write_results({"bytes": pieces * PIECE, "direct_io": direct_ok, "runs": runs, "median": med, "speedup": speed, "cpu_ratio": cpu}, args.json, "write_path")
    return 0


if __name__ == "__main__":
    sys.exit(main())
