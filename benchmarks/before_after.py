"""The merge, security and eval benchmarks on this checkout and on an earlier revision, interleaved.

The revision is exported with ``git archive`` into a temporary folder; every measurement runs
that tree's own benchmark script (so each side imports its own fedmerge) in a fresh process,
before then after, ``--repeats`` times, so load that comes and goes on a shared machine falls on
both sides alike. Compared: CPU seconds (user + system of every thread; steadier than wall time
under load), with wall time and peak RSS beside them.

- merge: ``merge_throughput.py --child METHOD`` on the ~1B set (``--merge-methods``);
- security: ``security_overhead.py --half --no-extras`` whole (read, pack + seal, verify + open);
- eval: ``eval_cost.py`` with a small item count, zero shots, the 1 M model.

    .venv/bin/python benchmarks/before_after.py --baseline REV [--repeats 2] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def export(rev: str, dest: Path) -> Path:
    dest.mkdir(parents=True, exist_ok=True)
    archive = subprocess.run(["git", "-C", str(ROOT), "archive", rev], check=True, capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", str(dest)], input=archive, check=True)
    return dest


def _run(cmd: list[str], tree: Path) -> tuple[dict, str]:
    env = {**os.environ, "PYTHONPATH": str(tree)}
    before = os.times()
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=tree, capture_output=True, text=True, env=env)
    wall = time.perf_counter() - t0
    after = os.times()
    cpu = (after.children_user - before.children_user) + (after.children_system - before.children_system)
    if proc.returncode != 0:
        return {"error": (proc.stderr.strip().splitlines() or ["?"])[-1]}, proc.stdout
    return {"seconds": wall, "cpu_seconds": cpu, "load": os.getloadavg()[0]}, proc.stdout


def merge_case(method: str, base: Path, fts: list[Path], work: Path):
    def run(tree: Path) -> dict:
        out = work / "merge-out"
        shutil.rmtree(out, ignore_errors=True)
        cmd = [sys.executable, str(tree / "benchmarks" / "merge_throughput.py"), "--child", method, "--base", str(base), "--out", str(out), "--device", "cpu", "--inputs", *map(str, fts)]
        r, stdout = _run(cmd, tree)
        shutil.rmtree(out, ignore_errors=True)
        if "error" not in r:
            child = json.loads(stdout.strip().splitlines()[-1])
            r.update(seconds=child["seconds"], cpu_seconds=child["cpu_seconds"], peak_rss_mb=child["peak_rss_mb"])
        return r

    return f"merge {method}", run


def security_case():
    def run(tree: Path) -> dict:
        return _run([sys.executable, str(tree / "benchmarks" / "security_overhead.py"), "--half", "--no-extras"], tree)[0]

    return "security pack+verify (0.63B)", run


def eval_case(items: int):
    def run(tree: Path) -> dict:
        cmd = [sys.executable, str(tree / "benchmarks" / "eval_cost.py"), "--items", str(items), "--shots", "0", "--sizes", "1m", "--json", os.devnull]
        return _run(cmd, tree)[0]

    return f"eval {items} items", run


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--baseline", required=True, metavar="REV")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--merge-methods", default="task_arithmetic,ties")
    ap.add_argument("--eval-items", type=int, default=20)
    ap.add_argument("--skip", default="", help="comma-separated: merge, security, eval")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)

    from benchmarks.common import ensure_1b_set

    skip = set(filter(None, args.skip.split(",")))
    base, fts = ensure_1b_set()
    with tempfile.TemporaryDirectory(prefix="fedmerge-before-after-") as tmp:
        work = Path(tmp)
        trees = {"before": export(args.baseline, work / "before"), "after": ROOT}
        cases = []
        if "merge" not in skip:
            cases += [merge_case(m, base, fts, work) for m in args.merge_methods.split(",")]
        if "security" not in skip:
            cases.append(security_case())
        if "eval" not in skip:
            cases.append(eval_case(args.eval_items))
        results = {"baseline": args.baseline, "load_avg_at_start": os.getloadavg(), "cases": {}}
        print(f"{'case':28s} {'side':6s} {'wall s':>8s} {'CPU s':>8s} {'peak MB':>8s} {'load':>5s}")
        for name, run in cases:
            rows: dict[str, list[dict]] = {"before": [], "after": []}
            for _ in range(args.repeats):
                for side in ("before", "after"):
                    r = run(trees[side])
                    rows[side].append(r)
                    if "error" in r:
                        print(f"{name:28s} {side:6s} ERROR {r['error']}", flush=True)
                    else:
                        print(f"{name:28s} {side:6s} {r['seconds']:8.1f} {r['cpu_seconds']:8.1f} {r.get('peak_rss_mb', 0):8.0f} {r['load']:5.1f}", flush=True)
            ok = {s: [r for r in rs if "error" not in r] for s, rs in rows.items()}
            summary = {}
            if ok["before"] and ok["after"]:
                cpu = {s: statistics.median(r["cpu_seconds"] for r in rs) for s, rs in ok.items()}
                summary = {"cpu_before": cpu["before"], "cpu_after": cpu["after"], "cpu_after_over_before": cpu["after"] / cpu["before"]}
            results["cases"][name] = {"runs": rows, **summary}
        print(f"\n{'case':28s} {'CPU before':>11s} {'CPU after':>10s} {'after/before':>13s}")
        for name, res in results["cases"].items():
            if "cpu_before" in res:
                print(f"{name:28s} {res['cpu_before']:11.1f} {res['cpu_after']:10.1f} {res['cpu_after_over_before']:13.2f}")
    from benchmarks.common import write_results

    write_results(results, args.json, "before_after")
    return 0


if __name__ == "__main__":
    sys.exit(main())
