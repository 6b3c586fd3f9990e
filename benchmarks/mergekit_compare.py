"""fedmerge against mergekit 0.1.5: the same YAML through both, on the ~1B bf16 set, same run.

mergekit lives in its own virtual environment, made by this script on first use
(``${FEDMERGE_CACHE:-~/.cache/fedmerge}/mergekit-venv``: ``pip install mergekit==0.1.5`` with
``torch==2.13.0``, the CPU build, so pip pulls no CUDA torch); fedmerge runs from this checkout
with the interpreter that runs the script. For every method, one mergekit-format YAML (base and
the two fine-tunes of ``benchmarks/common.py``, bf16 output) is merged by ``mergekit-yaml`` and
by ``fedmerge merge``, alternately, ``--repeats`` times (fedmerge, mergekit, fedmerge, ...), each
run a fresh process whose wall time, CPU time (user + system, every thread and child) and peak
RSS (its VmHWM, sampled from /proc, children included) are recorded. Before every run the input
files are read once, so each tool starts from the same warm page cache (mergekit's ~9 GB resident
set, and the kernel's reclaim of pages left cold, evict them between runs). The load average is
printed with every run: wall times move with it on a shared machine; CPU time and peak RSS much
less.

    .venv/bin/python benchmarks/mergekit_compare.py [--methods task_arithmetic,ties] [--repeats 3] [--json out.json]
    .venv/bin/python benchmarks/mergekit_compare.py --setup-only     # just make the environment

Reported per method: the median of each figure for both tools and the ratios mergekit / fedmerge
(how many times faster, how many times less CPU) and fedmerge / mergekit for peak RSS.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

MERGEKIT = "mergekit==0.1.5"
TORCH = "torch==2.13.0"  # the CPU build (2.13.0+cpu is what the project's own environment runs)

# mergekit-format parameters per method (both tools read the same YAML).
METHODS = {
    "linear": "parameters: {weight: 0.5}",
    "task_arithmetic": "parameters: {weight: 0.5}",
    "ties": "parameters: {weight: 0.5, density: 0.5}",
    "dare_ties": "parameters: {weight: 0.5, density: 0.5}",
    "dare_linear": "parameters: {weight: 0.5, density: 0.5}",
    "breadcrumbs": "parameters: {weight: 0.5, density: 0.8, gamma: 0.01}",
    "breadcrumbs_ties": "parameters: {weight: 0.5, density: 0.8, gamma: 0.01}",
    "della": "parameters: {weight: 0.5, density: 0.5, epsilon: 0.1}",
    "model_stock": "",
    "slerp": "",
}


def venv_dir() -> Path:
    return Path(os.environ.get("FEDMERGE_CACHE") or Path.home() / ".cache" / "fedmerge") / "mergekit-venv"


def ensure_mergekit() -> Path:
    """The ``mergekit-yaml`` of a virtual environment holding mergekit 0.1.5 and CPU torch (made
    on first use; a marker file says it was completed, so an interrupted install is redone)."""
    venv = venv_dir()
    exe, done = venv / "bin" / "mergekit-yaml", venv / ".fedmerge-complete"
    if exe.exists() and done.exists():
        return exe
    shutil.rmtree(venv, ignore_errors=True)
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    python = str(venv / "bin" / "python")
    subprocess.run([python, "-m", "pip", "install", "--quiet", TORCH, MERGEKIT], check=True)
    version = subprocess.run([python, "-c", "import torch; print(torch.__version__)"], capture_output=True, text=True, check=True).stdout.strip()
    if not version.endswith("+cpu"):
        raise SystemExit(f"the mergekit environment {venv} got torch {version}, not the CPU build; check pip's indexes")
    done.write_text(f"{MERGEKIT} {TORCH} ({version})\n")
    return exe


def model_views(folders: list[Path], into: Path) -> list[Path]:
    """The benchmark models as both tools can read them: the same weight files (links), and a
    ``config.json`` that names the architecture (mergekit requires ``architectures``; the
    generated set's config leaves it out)."""
    out = []
    for folder in folders:
        view = into / folder.name
        view.mkdir(parents=True, exist_ok=True)
        for f in folder.iterdir():
            target = view / f.name
            if f.name == "config.json":
                cfg = json.loads(f.read_text())
                cfg.setdefault("architectures", ["MistralForCausalLM"])
                target.write_text(json.dumps(cfg, indent=2))
            elif not target.exists():
                target.symlink_to(f.resolve())
        out.append(view)
    return out


def recipe(method: str, base: Path, fts: list[Path]) -> str:
    params = METHODS[method]
    if method == "slerp":  # two models: the base and one fine-tune, t 0.5
        return f"merge_method: slerp\nbase_model: {base}\nmodels:\n  - model: {base}\n  - model: {fts[0]}\nparameters: {{t: 0.5}}\ndtype: bfloat16\n"
    models = "".join(f"  - model: {f}\n" + (f"    {params}\n" if params else "") for f in fts)
    base_line = "" if method == "linear" else f"base_model: {base}\n"
    return f"merge_method: {method}\n{base_line}models:\n{models}dtype: bfloat16\n"


def _proc_tree(pid: int) -> list[int]:
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        try:
            kids = Path(f"/proc/{p}/task/{p}/children").read_text().split()
        except OSError:
            continue
        todo.extend(int(k) for k in kids)
    return out


def _hwm_kb(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def measure(cmd: list[str], env: dict[str, str] | None = None) -> dict:
    """Run ``cmd``; wall seconds, CPU seconds (children's rusage) and peak RSS (VmHWM of the
    process tree, sampled every 50 ms)."""
    before = os.times()
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    peak = {"kb": 0}
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            peak["kb"] = max(peak["kb"], sum(_hwm_kb(p) for p in _proc_tree(proc.pid)))
            done.wait(0.05)

    th = threading.Thread(target=sample, daemon=True)
    th.start()
    output, _ = proc.communicate()
    done.set()
    th.join()
    seconds = time.perf_counter() - t0
    after = os.times()
    cpu = (after.children_user - before.children_user) + (after.children_system - before.children_system)
    if proc.returncode != 0:
        return {"error": (output.strip().splitlines() or ["?"])[-1], "seconds": seconds}
    return {"seconds": seconds, "cpu_seconds": cpu, "peak_rss_mb": peak["kb"] / 1024, "load": os.getloadavg()[0]}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--methods", default="task_arithmetic,ties,dare_ties,breadcrumbs,della,model_stock,linear,slerp")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--json", default=None, help="write the results here (default: benchmarks/results/mergekit_compare.json)")
    ap.add_argument("--cache-dir", default=None)
    ap.add_argument("--setup-only", action="store_true", help="make the mergekit environment and stop")
    args = ap.parse_args(argv)

    mergekit_yaml = ensure_mergekit()
    if args.setup_only:
        print(mergekit_yaml)
        return 0
    from benchmarks.common import cache_root, ensure_1b_set, warm_page_cache

    base, fts = ensure_1b_set(args.cache_dir)
    work = cache_root(args.cache_dir) / "mergekit-compare"
    work.mkdir(parents=True, exist_ok=True)
    base, *fts = model_views([base, *fts], work / "models")
    fedmerge_cli = [sys.executable, "-m", "fedmerge", "merge"]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    results = {"machine": {"cpus": os.cpu_count(), "load_avg_at_start": os.getloadavg()}, "mergekit": MERGEKIT, "set": str(base.parent), "methods": {}}
    print(f"{'method':18s} {'tool':9s} {'run':>3s} {'wall s':>8s} {'CPU s':>8s} {'peak RSS MB':>12s} {'load':>5s}")
    for method in args.methods.split(","):
        cfg = work / f"{method}.yaml"
        cfg.write_text(recipe(method, base, fts))
        runs: dict[str, list[dict]] = {"fedmerge": [], "mergekit": []}
        for rep in range(args.repeats):
            for tool in ("fedmerge", "mergekit"):
                out = work / f"out-{tool}"
                shutil.rmtree(out, ignore_errors=True)
                warm_page_cache([base, *fts])  # neither tool pays for what the other evicted
                if tool == "fedmerge":
                    r = measure([*fedmerge_cli, str(cfg), str(out), "-q"], env)
                else:
                    r = measure([str(mergekit_yaml), str(cfg), str(out)], None)
                shutil.rmtree(out, ignore_errors=True)
                runs[tool].append(r)
                if "error" in r:
                    print(f"{method:18s} {tool:9s} {rep:3d} ERROR {r['error']}", flush=True)
                else:
                    print(f"{method:18s} {tool:9s} {rep:3d} {r['seconds']:8.1f} {r['cpu_seconds']:8.1f} {r['peak_rss_mb']:12.0f} {r['load']:5.1f}", flush=True)
        results["methods"][method] = {"runs": runs, **_summary(runs)}
    print()
    print(f"{'method':18s} {'fedmerge s':>10s} {'mergekit s':>10s} {'x faster':>9s} {'x less CPU':>10s} {'RSS MB f/m':>14s} {'RSS f/m':>8s}")
    for method, res in results["methods"].items():
        if "speedup" in res:
            print(
                f"{method:18s} {res['fedmerge']['seconds']:10.1f} {res['mergekit']['seconds']:10.1f} {res['speedup']:9.2f} {res['cpu_ratio']:10.2f} "
                f"{res['fedmerge']['peak_rss_mb']:6.0f}/{res['mergekit']['peak_rss_mb']:<6.0f} {res['rss_ratio']:8.2f}"
            )
    from benchmarks.common import write_results

    write_results(results, args.json, "mergekit_compare")
    return 0


def _summary(runs: dict[str, list[dict]]) -> dict:
    ok = {tool: [r for r in rs if "error" not in r] for tool, rs in runs.items()}
    if not ok["fedmerge"] or not ok["mergekit"]:
        return {}
    med = {tool: {k: statistics.median(r[k] for r in rs) for k in ("seconds", "cpu_seconds", "peak_rss_mb")} for tool, rs in ok.items()}
    return {
        **med,
        "speedup": med["mergekit"]["seconds"] / med["fedmerge"]["seconds"],
        "cpu_ratio": med["mergekit"]["cpu_seconds"] / med["fedmerge"]["cpu_seconds"],
        "rss_ratio": med["fedmerge"]["peak_rss_mb"] / med["mergekit"]["peak_rss_mb"],
    }


if __name__ == "__main__":
    sys.exit(main())
