"""The demo run: world -> federation round -> every merge strategy -> evaluator -> report.

1. The world (base + one fine-tune per hospital + exam tasks) is built, or found in the cache.
2. A federation runs: the coordinator's round loop and each hospital's ClientApp, with signed
   (and sealed) delta packages, verified and spooled by the coordinator, merged by the engine.
3. The round's verified contributions are merged again at the coordinator with every strategy
   in the config (one federation, many merges: identical inputs for every method), and DARE-TIES
   is swept over densities.
4. The evaluator scores the base, each hospital, the federation's model and every merge; the
   table, the plots and the raw results are written to the output folder.
"""

from __future__ import annotations

import json
import logging
import shutil
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Callable

from fedmerge.demo.config import DemoConfig, MergeEntry
from fedmerge.demo.world import World, ensure_world

log = logging.getLogger(__name__)

# Loggers of libraries that narrate every step; the demo prints its own progress instead.
_CHATTY = ("lm_eval", "lm-eval", "fedmerge.eval", "fedmerge.server", "fedmerge.client", "fedmerge.federation",
           "fedmerge.merging", "fedmerge.security", "flwr", "transformers", "datasets", "httpx", "filelock")


@contextmanager
def _quieted(names: tuple[str, ...]):
    """Loggers held at ERROR for the demo, their levels given back after (the process may go on)."""
    saved = {n: logging.getLogger(n).level for n in names}
    for n in names:
        logging.getLogger(n).setLevel(logging.ERROR)
    try:
        yield
    finally:
        for n, level in saved.items():
            logging.getLogger(n).setLevel(level)


@dataclass
class Scored:
    """One row of the comparison."""

    label: str
    role: str  # base | parent | merge
    method: str | None
    parameters: dict[str, Any]
    scores: dict[str, tuple[float, float | None]]  # task -> (accuracy, stderr)
    seconds: float = 0.0

    def mean(self, tasks: list[str]) -> float:
        return sum(self.scores[t][0] for t in tasks) / len(tasks)


@dataclass
class DemoResult:
    out: Path
    report: Path
    results: Path
    table: str
    rows: list[Scored]
    sweep: list[tuple[float, Scored]]
    timings: dict[str, float] = field(default_factory=dict)
    world_built: bool = False


class Clock:
    """Wall time per stage, for the report's breakdown."""

    def __init__(self) -> None:
        self.t0 = time.perf_counter()
        self.stages: dict[str, float] = {}

    def stage(self, name: str, seconds: float) -> None:
        self.stages[name] = self.stages.get(name, 0.0) + seconds

    def elapsed(self) -> float:
        return time.perf_counter() - self.t0


def run_demo(
    config: DemoConfig,
    out: str | Path = "fedmerge-demo",
    *,
    cache: str | Path | None = None,
    rebuild: bool = False,
    keep_models: bool = False,
    quiet_libraries: bool = True,
    say: Callable[[str], None] = print,
) -> DemoResult:
    with _quieted(_CHATTY if quiet_libraries else ()):
        return _run_demo(config, out, cache, rebuild, keep_models, say)


def _run_demo(config: DemoConfig, out: str | Path, cache: str | Path | None, rebuild: bool, keep_models: bool, say: Callable[[str], None]) -> DemoResult:
    import torch

    torch.set_num_threads(config.world.threads)
    clock = Clock()
    out = Path(out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    for stale in ("results.db", "results.json", "report.md", "density_sweep.png"):
        (out / stale).unlink(missing_ok=True)

    def step(msg: str) -> None:
        say(f"[{clock.elapsed():6.1f}s] {msg}")

    # 1. the world
    t = time.perf_counter()
    step("world: looking for a cached world ...")
    world, built = ensure_world(config.world, cache, rebuild=rebuild, say=step)
    clock.stage("world", time.perf_counter() - t)
    step(f"world: {'built' if built else 'cached'} at {world.root} ({world.manifest['parameters'] / 1e6:.2f} M parameters per model)")

    work = Path(tempfile.mkdtemp(prefix="fedmerge-demo-"))
    try:
        # 2. the federation
        t = time.perf_counter()
        fed = _run_federation(config, world, work / "federation", step)
        clock.stage("federation", time.perf_counter() - t)

        # 3 + 4. merges and scores
        evaluator = _evaluator(config, world, out / "results.db")
        tasks = world.task_names
        rows: list[Scored] = []

        def score(label: str, role: str, model_dir: Path, method: str | None = None, params: dict | None = None) -> Scored:
            te = time.perf_counter()
            res = evaluator.evaluate(str(model_dir), label=label, role=role, strategy=method, params=params, round=None)
            clock.stage("evaluation", time.perf_counter() - te)
            scores = {tk: (res.value(tk), res.stderr(tk)) for tk in tasks}
            row = Scored(label, role, method, dict(params or {}), scores, res.seconds)
            cells = "  ".join(f"{_short(tk)} {100 * v:5.1f}" for tk, (v, _) in scores.items())
            step(f"scored {label:<28s} {cells}")
            return row

        institutions = fed.institutions  # institution -> specialty
        step(f"evaluating the base and the {len(institutions)} hospitals on {len(tasks)} tasks, {config.evaluation.num_fewshot}-shot")
        rows.append(score("base", "base", world.base))
        for inst, specialty in institutions.items():
            rows.append(score(f"{inst} ({specialty})", "parent", world.hospitals[specialty]))
        rows.append(score(f"federation round {fed.round} ({config.federation.method})", "merge", Path(fed.model_dir),
                          config.federation.method, config.federation.parameters))

        from fedmerge.merging.strategies import available

        known = available()
        skipped: dict[str, str] = {}
        merge_seconds: dict[str, float] = {}
        cache_rows: dict[str, Scored] = {}
        for entry in config.merges:
            if entry.method not in known:
                skipped[entry.label] = f"method {entry.method!r} is not in this build's registry"
                step(f"skipping {entry.label}: {skipped[entry.label]}")
                continue
            model_dir, secs = _merge(fed, entry, work / "merges" / entry.label, clock)
            merge_seconds[entry.label] = secs
            row = score(entry.label, "merge", model_dir, entry.method, entry.parameters)
            rows.append(row)
            cache_rows[_spec_key(entry.method, entry.parameters)] = row
            _keep_or_drop(model_dir, out / "models" / entry.label if keep_models else None)

        sweep: list[tuple[float, Scored]] = []
        if config.density_sweep and config.sweep_method in known:
            step(f"sweeping {config.sweep_method} density over {', '.join(f'{d:g}' for d in config.density_sweep)}")
            for d in config.density_sweep:
                params = {**config.sweep_parameters, "density": d}
                key = _spec_key(config.sweep_method, params)
                if key in cache_rows:  # the same merge was already scored in the comparison
                    sweep.append((d, cache_rows[key]))
                    continue
                label = f"{config.sweep_method} d={d:g}"
                entry = MergeEntry(label=label, method=config.sweep_method, parameters=params)
                model_dir, _ = _merge(fed, entry, work / "sweep" / f"{d:g}", clock)
                row = score(label, "merge", model_dir, entry.method, params)
                sweep.append((d, row))
                cache_rows[key] = row
                _keep_or_drop(model_dir, out / "models" / "sweep" / f"{d:g}" if keep_models else None)
        if keep_models:
            _keep_or_drop(Path(fed.model_dir), out / "models" / f"federation-round-{fed.round}", copy=True)

        # 5. the report
        t = time.perf_counter()
        from fedmerge.demo.report import write_demo_report

        files = write_demo_report(out, config, world, built, fed, rows, sweep, skipped, merge_seconds, clock.stages, clock.elapsed())
        clock.stage("report", time.perf_counter() - t)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    total = clock.elapsed()
    step(f"done in {total:.1f} s")
    return DemoResult(out, files.markdown, files.results, files.table, rows, sweep, {**clock.stages, "total": total}, built)


# -- the federation ----------------------------------------------------------------------------------
@dataclass
class FederationRun:
    round: int
    reference_dir: Path
    delta_dirs: dict[str, Path]  # institution -> verified delta folder, in institution order
    model_dir: Path
    institutions: dict[str, str]  # institution -> specialty
    record: dict[str, Any]
    bytes_sent: dict[str, int]
    installed: dict[str, list[int]]
    seconds: float


def _run_federation(config: DemoConfig, world: World, root: Path, step: Callable[[str], None]) -> FederationRun:
    """Lay out keys, trust store and configs for one hospital per specialty, then run the rounds."""
    from fedmerge.federation.inprocess import run_simulation
    from fedmerge.federation.toy import build_toy_federation, institution_names

    specialties = list(world.hospitals)
    names = institution_names(len(specialties))
    models = SimpleNamespace(base=world.base, finetunes={n: world.hospitals[s] for n, s in zip(names, specialties)})
    layout = build_toy_federation(
        root,
        n_clients=len(specialties),
        rounds=config.federation.rounds,
        strategy={"method": config.federation.method, "parameters": dict(config.federation.parameters)},
        seal=config.federation.seal,
        part_bytes=1 << 20,
        models_from=models,
    )
    sealed = "signed and sealed" if config.federation.seal else "signed"
    step(f"federation: coordinator + {len(names)} hospitals ({', '.join(f'{n}={s}' for n, s in zip(names, specialties))}); "
         f"{config.federation.rounds} round(s), {sealed} delta packages, strategy {config.federation.method}")
    t = time.perf_counter()
    report = run_simulation(layout.federation_config, [layout.client_configs[n] for n in names])
    seconds = time.perf_counter() - t
    last = report.rounds[-1]
    if last.status not in ("merged", "completed") or not last.model_dir:
        raise RuntimeError(f"federation round {last.round} ended with status {last.status!r}: {last.record.failure}")
    rejected = last.record.rejections
    step(f"federation: round {last.round} merged {len(last.delta_dirs)} verified contribution(s)"
         f"{f', rejected {len(rejected)}' if rejected else ''}; every hospital installed rounds "
         f"{sorted({r for rs in report.installed.values() for r in rs})} ({seconds:.1f} s)")
    return FederationRun(
        round=last.round,
        reference_dir=Path(last.reference_dir),
        delta_dirs={inst: Path(last.delta_dirs[inst]) for inst in names if inst in last.delta_dirs},
        model_dir=Path(last.model_dir),
        institutions={n: s for n, s in zip(names, specialties) if n in last.delta_dirs},
        record=last.record.model_dump(mode="json"),
        bytes_sent=dict(report.bytes_sent),
        installed=dict(report.installed),
        seconds=seconds,
    )


def _merge(fed: FederationRun, entry: MergeEntry, out_dir: Path, clock: Clock) -> tuple[Path, float]:
    """Merge the round's verified contributions with one strategy, through the engine."""
    from fedmerge.merging.engine import MergeSpec, merge
    from fedmerge.merging.taskvector import DeltaCheckpoint

    t = time.perf_counter()
    inputs = [DeltaCheckpoint(d, label=inst) for inst, d in fed.delta_dirs.items()]
    spec = MergeSpec(method=entry.method, parameters=dict(entry.parameters), seed=0, device="cpu")
    merge(fed.reference_dir, inputs, out_dir, spec, progress=False, metadata={"demo": entry.label, "round": fed.round})
    secs = time.perf_counter() - t
    clock.stage("merging", secs)
    return out_dir, secs


def _keep_or_drop(model_dir: Path, keep_at: Path | None, copy: bool = False) -> None:
    if keep_at is None:
        if not copy:
            shutil.rmtree(model_dir, ignore_errors=True)
        return
    if keep_at.exists():
        shutil.rmtree(keep_at)
    keep_at.parent.mkdir(parents=True, exist_ok=True)
    (shutil.copytree if copy else shutil.move)(str(model_dir), str(keep_at))


def _spec_key(method: str, params: dict[str, Any]) -> str:
    return json.dumps([method, params], sort_keys=True)


def _evaluator(config: DemoConfig, world: World, store: Path):
    from fedmerge.eval.config import EvalConfig
    from fedmerge.eval.evaluator import Evaluator

    cfg = EvalConfig(
        tasks=world.task_names,
        task_dirs=[world.tasks_dir],
        num_fewshot=config.evaluation.num_fewshot,
        device="cpu",
        dtype="float32",
        batch_size=config.evaluation.batch_size,
        seed=config.evaluation.seed,
        store=store,
        bootstrap_iters=100,  # acc has a closed-form stderr; lm-eval skips every stderr at 0
    )
    return Evaluator(cfg)


def _short(task: str) -> str:
    return task.removeprefix("demo_")[:10]


__all__ = ["run_demo", "DemoResult", "Scored", "FederationRun"]
