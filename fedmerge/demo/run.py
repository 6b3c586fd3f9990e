"""The demo run: world -> federation rounds -> every merge strategy -> evaluator -> report.

``DemoRun`` runs one world per seed through four named stages, then writes one report:

1. ``world``: the base, one fine-tune per hospital, the test exams and the validation splits are
   built, or found in the cache.
2. ``federation``: a federation of one hospital per specialty runs its rounds in one process (the
   coordinator's round loop and each hospital's ClientApp, signed and sealed delta packages).
   Between rounds each hospital trains the current global model on its own text (its client's
   ``train_hook``); each round the coordinator chooses the model it publishes among candidate
   merges, scored on validation data only (``selection``). The test exams are not read here.
3. ``compare``: the first round's verified contributions (every hospital's fine-tune against the
   base) are merged again with every strategy of the config, the paper's six and its hierarchical
   rule included, and DARE-TIES is swept over densities: one set of inputs for every method.
4. ``score``: the evaluator scores the base, each hospital, each round's published model and every
   merge on the test exams, item by item (for the report's paired intervals).

The report (``fedmerge.demo.report``) pools the worlds.
"""

from __future__ import annotations

import json
import logging
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from fedmerge import console
from fedmerge.demo.config import DemoConfig, MergeEntry
from fedmerge.errors import FedmergeError
from fedmerge.devices import torch_threads
from fedmerge.demo.world import CONSORTIUM, World, ensure_world, write_validation_config

log = logging.getLogger(__name__)

# Parts of a few hundred KiB: every package of the demo's worlds travels in several parts.
_PART_BYTES = 256 << 10
_ROUND_TIMEOUT_S = 3600.0
# fedmerge parts whose info lines the demo tells as its own story (shown with -v).
_NARRATED = ("fedmerge.server", "fedmerge.client", "fedmerge.federation", "fedmerge.merging", "fedmerge.security", "fedmerge.eval")


class RoundNotPublished(FedmergeError):
    """A round of the demo's federation ended without publishing a model (its record says why)."""


@dataclass
class Scored:
    """One model's test scores in one world."""

    label: str
    role: str  # base | parent | merge
    method: str | None
    parameters: dict[str, Any]
    scores: dict[str, tuple[float, float | None]]  # task -> (accuracy, stderr)
    items: dict[str, dict[str, float]] = field(default_factory=dict)  # task -> item id -> 1.0 / 0.0
    seconds: float = 0.0
    round: int | None = None  # the federation round that published it
    key: str = ""  # the same model in every world (labels of published models name their method)

    def __post_init__(self) -> None:
        self.key = self.key or self.label

    def mean(self, tasks: list[str]) -> float:
        return sum(self.scores[t][0] for t in tasks) / len(tasks)


@dataclass
class PublishedRound:
    """What one federation round published, and why."""

    round: int
    model_dir: Path
    method: str
    parameters: dict[str, Any]
    record: dict[str, Any]
    local: dict[str, dict[str, Any]]  # institution -> what its train hook did before the round

    @property
    def label(self) -> str:
        return f"federation round {self.round} ({describe(self.method, self.parameters)})"


@dataclass
class FederationRun:
    rounds: list[PublishedRound]
    first_reference: Path  # the base: what the first round's contributions are deltas from
    first_deltas: dict[str, Path]  # institution -> its verified first-round delta, in institution order
    institutions: dict[str, str]  # institution -> specialty
    bytes_sent: dict[str, int]
    installed: dict[str, list[int]]
    seconds: float

    @property
    def last(self) -> PublishedRound:
        return self.rounds[-1]


@dataclass
class WorldRun:
    """Everything one world contributed to the report."""

    seed: int
    world: World
    built: bool
    fed: FederationRun
    rows: list[Scored]
    sweep: list[tuple[float, Scored]]
    skipped: dict[str, str]
    merge_seconds: dict[str, float]
    store: Path


@dataclass
class DemoResult:
    out: Path
    report: Path
    results: Path
    table: str
    headline: str
    worlds: list[WorldRun]
    timings: dict[str, float] = field(default_factory=dict)

    @property
    def rows(self) -> list[Scored]:
        """The first world's rows (the only world unless ``--seeds``)."""
        return self.worlds[0].rows

    @property
    def world_built(self) -> bool:
        return any(w.built for w in self.worlds)


def describe(method: str, parameters: dict[str, Any]) -> str:
    """``iso_c alpha=0.75``: a merge as the report names it."""
    params = " ".join(f"{k}={v}" for k, v in sorted(parameters.items()))
    return f"{method} {params}".strip()


class Clock:
    """Wall time per stage, for the report's breakdown."""

    def __init__(self) -> None:
        self.t0 = time.perf_counter()
        self.stages: dict[str, float] = {}

    def add(self, name: str, seconds: float) -> None:
        self.stages[name] = self.stages.get(name, 0.0) + seconds

    def elapsed(self) -> float:
        return time.perf_counter() - self.t0


class DemoRun:
    """``fedmerge demo``: one world per seed through world / federation / compare / score, then the report."""

    def __init__(self, config: DemoConfig, out: str | Path = "fedmerge-demo", *, cache: str | Path | None = None,
                 rebuild: bool = False, keep_models: bool = False, seeds: int = 1):
        if seeds < 1:
            raise ValueError(f"seeds must be at least 1, got {seeds}")
        self.config = config
        self.out = Path(out).resolve()
        self.cache = cache
        self.rebuild = rebuild
        self.keep_models = keep_models
        self.seeds = [config.world.seed + i for i in range(seeds)]
        self.clock = Clock()

    def run(self) -> DemoResult:
        with torch_threads(self.config.world.threads), console.details(*_NARRATED):
            self._prepare_output()
            worlds = [self.run_world(seed) for seed in self.seeds]
            files = self.report(worlds)
        total = self.clock.elapsed()
        return DemoResult(self.out, files.markdown, files.results, files.table, files.headline, worlds, {**self.clock.stages, "total": total})

    def _prepare_output(self) -> None:
        self.out.mkdir(parents=True, exist_ok=True)
        for stale in ("results.db", "results.json", "report.md", "summary.md", "density_sweep.png", "rounds.png", "general_vs_specialties.png"):
            (self.out / stale).unlink(missing_ok=True)
        for stale in self.out.glob("world-*"):
            shutil.rmtree(stale, ignore_errors=True)

    def world_out(self, seed: int) -> Path:
        """Where one world's own files go: the output folder itself unless several worlds are pooled."""
        return self.out if len(self.seeds) == 1 else self.out / f"world-{seed}"

    def run_world(self, seed: int) -> WorldRun:
        world, built = self.world(seed)
        work = Path(tempfile.mkdtemp(prefix="fedmerge-demo-"))
        try:
            fed = self.federation(world, work / "federation")
            scorer = ExamScorer(self.config, world, self.world_out(seed) / "results.db", self.clock)
            rows = scorer.reference_rows(fed) + scorer.federation_rows(fed)
            merged, sweep, skipped, merge_seconds = self.compare(world, fed, scorer, work / "merges")
            if self.keep_models:
                for r in fed.rounds:
                    _keep(r.model_dir, self.world_out(seed) / "models" / f"federation-round-{r.round}", copy=True)
        finally:
            shutil.rmtree(work, ignore_errors=True)
        return WorldRun(seed, world, built, fed, rows + merged, sweep, skipped, merge_seconds, scorer.store)

    # -- 1. the world -------------------------------------------------------------------------------
    def world(self, seed: int) -> tuple[World, bool]:
        t = time.perf_counter()
        wcfg = self.config.world.model_copy(update={"seed": seed})
        with console.stage(f"world {seed}") as st:
            world, built = ensure_world(wcfg, self.cache, rebuild=self.rebuild, say=log.info)
            st.note(f"{'built' if built else 'cached'} at {world.root} ({world.manifest['parameters'] / 1e6:.2f} M parameters per model)")
        self.clock.add("world", time.perf_counter() - t)
        return world, built

    # -- 2. the federation --------------------------------------------------------------------------
    def federation(self, world: World, root: Path) -> FederationRun:
        t = time.perf_counter()
        fed = FederationStage(self.config, world, root).run()
        self.clock.add("federation", time.perf_counter() - t)
        return fed

    # -- 3 + 4. every strategy on the first round's contributions, scored ------------------------------
    def compare(self, world: World, fed: FederationRun, scorer: "ExamScorer", work: Path):
        from fedmerge.merging.strategies import available

        cfg = self.config
        known = available()
        skipped: dict[str, str] = {}
        merge_seconds: dict[str, float] = {}
        rows: list[Scored] = []
        by_spec: dict[str, Scored] = {}
        sweep_entries = []
        if cfg.density_sweep and cfg.sweep_method in known:
            sweep_entries = [(d, MergeEntry(label=f"{cfg.sweep_method} d={d:g}", method=cfg.sweep_method,
                                            parameters={**cfg.sweep_parameters, "density": d})) for d in cfg.density_sweep]
        keep_root = self.world_out(world.manifest["config"]["seed"]) / "models"
        todo = [e for e in cfg.merges] + [e for _, e in sweep_entries]
        with console.stage("compare strategies", total=len(todo), unit="merges") as st:
            for entry in cfg.merges:
                if entry.method not in known:
                    skipped[entry.label] = f"method {entry.method!r} is not in this build's registry"
                    log.warning("skipping %s: %s", entry.label, skipped[entry.label])
                    st.advance()
                    continue
                folder, merge_seconds[entry.label] = self._merge(fed, entry, work / entry.label)
                row = scorer.score(entry.label, "merge", folder, entry.method, entry.parameters)
                rows.append(row)
                by_spec[_spec_key(entry.method, entry.parameters)] = row
                _keep(folder, keep_root / entry.label if self.keep_models else None)
                st.advance()
            sweep: list[tuple[float, Scored]] = []
            for d, entry in sweep_entries:
                key = _spec_key(entry.method, entry.parameters)
                if key not in by_spec:  # not already scored in the comparison
                    folder, _ = self._merge(fed, entry, work / "sweep" / f"{d:g}")
                    by_spec[key] = scorer.score(entry.label, "merge", folder, entry.method, entry.parameters)
                    _keep(folder, keep_root / "sweep" / f"{d:g}" if self.keep_models else None)
                sweep.append((d, by_spec[key]))
                st.advance()
            st.note(f"{len(rows)} strategies on the first round's contributions, {len(sweep)} densities")
        return rows, sweep, skipped, merge_seconds

    def _merge(self, fed: FederationRun, entry: MergeEntry, out_dir: Path) -> tuple[Path, float]:
        """Merge the first round's verified contributions with one strategy, through the engine."""
        from fedmerge.merging.engine import MergeSpec, merge
        from fedmerge.merging.taskvector import DeltaCheckpoint

        t = time.perf_counter()
        inputs = [DeltaCheckpoint(d, label=inst) for inst, d in fed.first_deltas.items()]
        spec = MergeSpec(method=entry.method, parameters=dict(entry.parameters), seed=0, device="cpu")
        merge(fed.first_reference, inputs, out_dir, spec, progress=False, metadata={"demo": entry.label, "round": 1})
        secs = time.perf_counter() - t
        self.clock.add("merging", secs)
        return out_dir, secs

    # -- 5. the report ------------------------------------------------------------------------------
    def report(self, worlds: list[WorldRun]):
        from fedmerge.demo.report import write_demo_report

        t = time.perf_counter()
        with console.stage("report") as st:
            files = write_demo_report(self.out, self.config, worlds, self.clock.stages, self.clock.elapsed())
            st.note(str(files.markdown))
        self.clock.add("report", time.perf_counter() - t)
        return files


class FederationStage:
    """Lay out one hospital per specialty (keys, trust store, configs, train hooks, validation
    splits), run the rounds in one process, and read back what each round published."""

    def __init__(self, config: DemoConfig, world: World, root: Path):
        self.config = config
        self.fed_cfg = config.federation
        self.world = world
        self.root = root

    def run(self) -> FederationRun:
        from fedmerge.federation.inprocess import run_simulation
        from fedmerge.federation.toy import institution_names

        specialties = list(self.world.hospitals)
        names = institution_names(len(specialties))
        layout = self.layout(names, specialties)
        f = self.fed_cfg
        sel = f.selection
        how = (f"selection {sel.mode} ({sel.rule} of {len(sel.candidates)} candidates)" if sel.mode != "none"
               else f"publishing {describe(f.method, f.parameters)}")
        training = f"{f.local_training.steps} local training steps between rounds" if f.local_training else "no local training"
        log.info("federation: %s; %d round(s), reference %s, %s, %s",
                 ", ".join(f"{n}={s}" for n, s in zip(names, specialties)), f.rounds, f.reference, training, how)
        t = time.perf_counter()
        with console.stage("federation", total=f.rounds, unit="rounds") as st:
            def on_event(event) -> None:
                if event.kind.value in ("completed", "refused"):
                    st.advance()

            report = run_simulation(layout.federation_config, [layout.client_configs[n] for n in names], on_event=on_event)
            seconds = time.perf_counter() - t
            rounds = [self._published(r, names) for r in report.rounds]
            for r in rounds:
                log.info("  round %d: %s", r.round, self._story(r))
            st.note(f"{len(rounds)} round(s) published")
        first = report.rounds[0]
        return FederationRun(
            rounds=rounds,
            first_reference=Path(first.reference_dir),
            first_deltas={inst: Path(first.delta_dirs[inst]) for inst in names if inst in first.delta_dirs},
            institutions={n: s for n, s in zip(names, specialties)},
            bytes_sent=dict(report.bytes_sent),
            installed=dict(report.installed),
            seconds=seconds,
        )

    def layout(self, names: list[str], specialties: list[str]):
        """Identities, trust store, the coordinator's config and one client.yaml per hospital."""
        import yaml

        from fedmerge.checkpoints.atomic import write_text_atomic
        from fedmerge.demo.localtrain import hook_command
        from fedmerge.demo.training import TrainSettings
        from fedmerge.federation.toy import build_toy_federation

        f, ev = self.fed_cfg, self.config.evaluation
        models = SimpleNamespace(base=self.world.base, finetunes={n: self.world.hospitals[s] for n, s in zip(names, specialties)})
        overrides: dict[str, Any] = {"reference": f.reference, "compression": f.compression, "publish_compression": f.compression}
        sel = f.selection
        if sel.mode != "none":
            selection: dict[str, Any] = {"mode": sel.mode, "rule": sel.rule, "max_candidates": sel.max_candidates,
                                         "candidates": [c.model_dump() for c in sel.candidates], "compression": f.compression}
            if sel.mode == "central":
                selection["eval_config"] = str(write_validation_config(self.world, CONSORTIUM, self.root.parent / "validation" / "consortium.yaml",
                                                                       num_fewshot=ev.num_fewshot, batch_size=ev.batch_size, seed=ev.seed))
            overrides["selection"] = selection
        layout = build_toy_federation(
            self.root, n_clients=len(names), rounds=f.rounds,
            strategy={"method": f.method, "parameters": dict(f.parameters)},
            seal=f.seal, part_bytes=_PART_BYTES, models_from=models, federation_overrides=overrides,
            # Messages reach the in-process hospitals one at a time, each training before it packs:
            # a round lasts as long as all of them together, slower still on a busy machine.
            round_timeout_s=_ROUND_TIMEOUT_S,
        )
        for i, (name, specialty) in enumerate(zip(names, specialties)):
            path = layout.client_configs[name]
            client = yaml.safe_load(path.read_text())
            if f.local_training is not None:
                lt = f.local_training
                settings = TrainSettings(steps=lt.steps, lr=lt.lr, batch_size=lt.batch_size, block_size=lt.block_size, warmup_steps=lt.warmup_steps)
                text = path.parent / f"{name}.text.jsonl"  # the hospital's own text, beside its config
                write_text_atomic(text, "".join(json.dumps(d) + "\n" for d in self.world.hospital_text(specialty, lt.general_share)))
                client["train_hook"] = hook_command(self.world.base, text, settings,
                                                    seed=self.world.manifest["config"]["seed"] + 500 + 10 * i, threads=self.config.world.threads)
            if sel.mode == "federated":
                client["validation"] = str(write_validation_config(self.world, specialty, path.parent / f"{name}.validation.yaml",
                                                                   num_fewshot=ev.num_fewshot, batch_size=ev.batch_size, seed=ev.seed))
            write_text_atomic(path, yaml.safe_dump(client, sort_keys=False))
        return layout

    def _published(self, r, names: list[str]) -> PublishedRound:
        from fedmerge.demo.localtrain import read_report

        if r.status != "completed" or not r.model_dir:
            raise RoundNotPublished(f"{self.root / 'coordinator'}: federation round {r.round} ended with status {r.status!r}: "
                                    f"{r.record.failure or (r.record.gate.reason if r.record.gate else 'no reason recorded')}")
        record = r.record.model_dump(mode="json")
        method, parameters = _published_spec(record)
        local = {}
        for inst in names:
            update = read_report(self.root / "clients" / inst / "trained" / f"round-{r.round:04d}")
            local[inst] = update.__dict__ if update is not None else {}
        return PublishedRound(r.round, Path(r.model_dir), method, parameters, record, local)

    @staticmethod
    def _story(r: PublishedRound) -> str:
        rec = r.record
        contributors = len(rec.get("contributions", {}))
        rejected = len(rec.get("rejections", []))
        chosen = describe(r.method, r.parameters)
        why = selection_reason(rec)
        return (f"{contributors} contribution(s){f', {rejected} rejected' if rejected else ''}; published {chosen}"
                + (f" ({why})" if why else ""))


def _published_spec(record: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    """The method and parameters of the model a round published: the chosen candidate, else the configured strategy."""
    sel = record.get("selection") or {}
    chosen = sel.get("chosen")
    for c in sel.get("candidates") or []:
        if c.get("id") == chosen:
            return c["strategy"]["method"], dict(c["strategy"].get("parameters") or {})
    strategy = record.get("strategy") or {}
    return strategy.get("method", "?"), dict(strategy.get("parameters") or {})


def selection_reason(record: dict[str, Any]) -> str:
    """Why a round published what it did, in a few words (from the selection part of its record)."""
    sel = record.get("selection") or {}
    if not sel:
        return ""
    if sel.get("fallback"):
        return f"fallback: {sel.get('reason') or 'no candidate was scored by every scorer'}"
    chosen, values = sel.get("chosen"), sel.get("values") or {}
    scorers = len(sel.get("scores") or {})
    if chosen in values:
        return (f"{sel.get('rule')} validation accuracy {100 * values[chosen]:.1f} over {scorers} scorer(s), "
                f"best of {len(sel.get('candidates') or [])} candidates")
    return str(sel.get("reason") or "")


class ExamScorer:
    """The evaluator on the test exams, item by item; used only after the federation has finished."""

    def __init__(self, config: DemoConfig, world: World, store: Path, clock: Clock):
        from fedmerge.eval.config import EvalConfig
        from fedmerge.eval.evaluator import Evaluator

        store.parent.mkdir(parents=True, exist_ok=True)
        store.unlink(missing_ok=True)
        self.store = store
        self.world = world
        self.clock = clock
        self.tasks = world.task_names
        ev = config.evaluation
        self.evaluator = Evaluator(EvalConfig(
            tasks=self.tasks, task_dirs=[world.tasks_dir], num_fewshot=ev.num_fewshot, device="cpu", dtype="float32",
            batch_size=ev.batch_size, seed=ev.seed, store=store,
            bootstrap_iters=100,  # acc has a closed-form stderr; lm-eval skips every stderr at 0
        ))

    def score(self, label: str, role: str, model_dir: Path, method: str | None = None, params: dict | None = None,
              round: int | None = None, key: str = "") -> Scored:
        t = time.perf_counter()
        res = self.evaluator.evaluate(str(model_dir), label=label, role=role, strategy=method, params=params, round=round, items=True)
        self.clock.add("evaluation", time.perf_counter() - t)
        scores = {tk: (res.value(tk), res.stderr(tk)) for tk in self.tasks}
        return Scored(label, role, method, dict(params or {}), scores, {tk: res.items.get(tk, {}) for tk in self.tasks},
                      res.seconds, round=round, key=key)

    def reference_rows(self, fed: FederationRun) -> list[Scored]:
        """The base and every hospital's own model (role ``parent``)."""
        with console.stage("score base and hospitals", total=1 + len(fed.institutions), unit="models") as st:
            rows = [self.score("base", "base", self.world.base)]
            st.advance()
            for inst, specialty in fed.institutions.items():
                rows.append(self.score(f"{inst} ({specialty})", "parent", self.world.hospitals[specialty]))
                st.advance()
        return rows

    def federation_rows(self, fed: FederationRun) -> list[Scored]:
        """Each round's published model, labelled ``federation round N (method ...)``."""
        with console.stage("score published rounds", total=len(fed.rounds), unit="rounds") as st:
            rows = []
            for r in fed.rounds:
                rows.append(self.score(r.label, "merge", r.model_dir, r.method, r.parameters, round=r.round, key=f"federation round {r.round}"))
                st.advance()
        return rows


def _keep(model_dir: Path, keep_at: Path | None, copy: bool = False) -> None:
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


def run_demo(config: DemoConfig, out: str | Path = "fedmerge-demo", *, cache: str | Path | None = None, rebuild: bool = False,
             keep_models: bool = False, seeds: int = 1) -> DemoResult:
    """``DemoRun(...).run()``."""
    return DemoRun(config, out, cache=cache, rebuild=rebuild, keep_models=keep_models, seeds=seeds).run()


__all__ = ["run_demo", "DemoRun", "DemoResult", "Scored", "FederationRun", "PublishedRound", "WorldRun", "RoundNotPublished", "describe"]
