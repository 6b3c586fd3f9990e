"""Build (once) and cache the demo's world: knowledge, text, tokenizer, base, hospitals, exams.

Layout of ``<cache>/demo/<world key>/``::

    world.json            the config, what was built, training losses and timings
    corpus/<domain>.jsonl every training document, one JSON string per line
    tokenizer/            the tokenizer, trained on all the corpora
    base/                 the base model: pretrained on general medicine
    hospitals/<spec>/     one full fine-tune of the base per specialty
    tasks/                one local evaluator task per domain: its test exam, which only the
                          report's scoring reads
    validation/<spec>/    hospital <spec>'s private validation split: its own specialty's and
                          general medicine's validation items (conditions no test item asks about)
    validation/consortium/ every domain's validation items, for selection by the coordinator

Task files are written once the world is in place (they hold absolute paths) and again if the
cache is moved.

The folder is built under a temporary name and renamed when complete, so a half-built world is
never picked up; a second call with the same config finds it and returns at once.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from fedmerge.demo.config import WorldConfig
from fedmerge.devices import torch_threads
from fedmerge.demo.knowledge import GENERAL, RELATIONS, SPLITS, KnowledgeBase, build_knowledge

log = logging.getLogger(__name__)

TASK_PREFIX = "demo_"
VALIDATION_PREFIX = "demo_val_"
CONSORTIUM = "consortium"


def cache_root(explicit: str | Path | None = None) -> Path:
    if explicit is not None:
        return Path(explicit)
    return Path(os.environ.get("FEDMERGE_CACHE") or Path.home() / ".cache" / "fedmerge")


def task_name(domain: str) -> str:
    """The test exam of ``domain``."""
    return f"{TASK_PREFIX}{domain}"


def validation_task_name(domain: str) -> str:
    """The validation split of ``domain`` (never the same items as its test exam)."""
    return f"{VALIDATION_PREFIX}{domain}"


@dataclass(frozen=True)
class World:
    root: Path
    base: Path
    hospitals: dict[str, Path]  # specialty -> model folder
    tasks_dir: Path
    domains: list[str]  # "general" first, then the specialties
    manifest: dict[str, Any]

    @property
    def task_names(self) -> list[str]:
        return [task_name(d) for d in self.domains]

    @property
    def validation_root(self) -> Path:
        return self.root / "validation"

    def validation_dir(self, holder: str) -> Path:
        """The validation tasks of a specialty's hospital, or of the consortium (``CONSORTIUM``)."""
        if holder != CONSORTIUM and holder not in self.hospitals:
            raise KeyError(f"no hospital {holder!r} in this world; hospitals: {', '.join(self.hospitals)}")
        return self.validation_root / holder

    def validation_tasks(self, holder: str) -> list[str]:
        """A hospital validates on general medicine and its own specialty; the consortium on every domain."""
        domains = self.domains if holder == CONSORTIUM else [GENERAL, holder]
        self.validation_dir(holder)
        return [validation_task_name(d) for d in domains]

    def corpus(self, domain: str) -> list[str]:
        """The documents ``domain``'s model was trained on, as they were fed to the tokenizer."""
        lines = (self.root / "corpus" / f"{domain}.jsonl").read_text(encoding="utf-8").splitlines()
        return [json.loads(line) for line in lines]

    def hospital_text(self, specialty: str, general_share: bool) -> list[str]:
        """What a hospital trains on between rounds: its specialty's documents and, with
        ``general_share``, its own share of the general-medicine documents (every hospital a
        different share: document i goes to hospital i mod n)."""
        if specialty not in self.hospitals:
            raise KeyError(f"no hospital {specialty!r} in this world; hospitals: {', '.join(self.hospitals)}")
        docs = self.corpus(specialty)
        if general_share:
            i = list(self.hospitals).index(specialty)
            docs += self.corpus(GENERAL)[i :: len(self.hospitals)]
        return docs


def knowledge_of(config: WorldConfig) -> KnowledgeBase:
    return build_knowledge(config.specialties, config.conditions_per_domain, config.seed, config.validation_conditions)


def corpora_of(config: WorldConfig, kb: KnowledgeBase) -> dict[str, list[str]]:
    from fedmerge.demo.corpus import domain_corpus

    return {d.name: domain_corpus(d, config.corpus_passes, seed=config.seed + 1 + i) for i, d in enumerate(kb.domains)}


def ensure_world(config: WorldConfig, cache: str | Path | None = None, rebuild: bool = False, say: Callable[[str], None] = print) -> tuple[World, bool]:
    """The world for ``config``, built if absent. Returns (world, built_now)."""
    root = cache_root(cache) / "demo" / config.key()
    if root.exists() and not rebuild:
        try:
            return load_world(root), False
        except (OSError, ValueError, KeyError) as exc:
            say(f"cached world at {root} is unreadable ({exc}); rebuilding it")
    if root.exists():
        shutil.rmtree(root)
    tmp = root.with_name(f"{root.name}.tmp-{os.getpid()}")
    if tmp.exists():
        shutil.rmtree(tmp)
    try:
        build_world(config, tmp, say=say)
        os.replace(tmp, root)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return load_world(root), True


def load_world(root: str | Path) -> World:
    root = Path(root)
    manifest = json.loads((root / "world.json").read_text())
    specialties = manifest["config"]["specialties"]
    world = World(
        root=root,
        base=root / "base",
        hospitals={s: root / "hospitals" / s for s in specialties},
        tasks_dir=root / "tasks",
        domains=[GENERAL, *specialties],
        manifest=manifest,
    )
    for folder in [world.base, *world.hospitals.values()]:
        if not (folder / "config.json").exists():
            raise ValueError(f"{folder} has no config.json")
    _ensure_tasks(world)
    return world


def _task_files(world: World) -> dict[Path, list[str]]:
    """Every task folder of the world and the task names it holds."""
    folders = {world.tasks_dir: world.task_names}
    for holder in [*world.hospitals, CONSORTIUM]:
        folders[world.validation_dir(holder)] = world.validation_tasks(holder)
    return folders


def _ensure_tasks(world: World) -> None:
    """Write the test exams and the validation splits unless they are there and point at this folder.

    The evaluator's task files hold absolute data paths, so they are written where the world
    finally lives (not in the temporary build folder), and again if the cache was moved.
    """
    from fedmerge.demo.questions import exam_items
    from fedmerge.eval.tasks import write_local_task

    folders = _task_files(world)

    def in_place(folder: Path, name: str) -> bool:
        path = folder / f"{name}.yaml"
        return path.exists() and str(folder.resolve()) in path.read_text()

    if all(in_place(folder, n) for folder, names in folders.items() for n in names):
        return
    config = WorldConfig.model_validate(world.manifest["config"])
    kb = knowledge_of(config)
    items = {
        (split, d.name): exam_items(d, config.n_choices, seed=config.seed + offset + i, split=split)
        for split, offset in (("test", 200), ("validation", 300))
        for i, d in enumerate(kb.domains)
    }
    for folder, names in folders.items():
        split = "test" if folder == world.tasks_dir else "validation"
        prefix = TASK_PREFIX if split == "test" else VALIDATION_PREFIX
        for name in names:
            write_local_task(folder, name, items[(split, name.removeprefix(prefix))], kind="hellaswag")


def write_validation_config(world: World, holder: str, path: Path, *, num_fewshot: int, batch_size: int, seed: int) -> Path:
    """An eval config (``fedmerge.eval`` YAML) scoring models on ``holder``'s validation split only.

    ``holder`` is a specialty (its hospital's private split) or ``CONSORTIUM``. Settings match the
    report's evaluator, so a validation score and a test score measure the same thing.
    """
    import yaml

    from fedmerge.checkpoints.atomic import write_text_atomic

    body = {
        "tasks": world.validation_tasks(holder),
        "task_dirs": [str(world.validation_dir(holder).resolve())],
        "num_fewshot": num_fewshot,
        "device": "cpu",
        "dtype": "float32",
        "batch_size": batch_size,
        "seed": seed,
        "bootstrap_iters": 0,
        "store": None,
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(path, f"# validation split of {holder} (demo world {world.root.name}); no test item is in it\n"
                      + yaml.safe_dump(body, sort_keys=False))
    return path


def build_world(config: WorldConfig, out: Path, say: Callable[[str], None] = print) -> None:
    """Everything from the seed: no file from outside this function is read."""
    import torch
    from transformers import AutoTokenizer, MistralForCausalLM

    from fedmerge.demo.training import TrainSettings, token_stream, train
    from fedmerge.toymodels import TinyMistralSpec, mistral_config, train_tokenizer

    timings: dict[str, float] = {}
    losses: dict[str, dict[str, float]] = {}
    with torch_threads(config.threads):
        t = time.perf_counter()
        out.mkdir(parents=True)
        kb = knowledge_of(config)
        corpora = corpora_of(config, kb)
        (out / "corpus").mkdir()
        for domain, docs in corpora.items():
            (out / "corpus" / f"{domain}.jsonl").write_text("".join(json.dumps(d) + "\n" for d in docs), encoding="utf-8")
        train_tokenizer(out / "tokenizer", vocab_size=config.model.vocab_size, texts=[d for docs in corpora.values() for d in docs])
        tok = AutoTokenizer.from_pretrained(str(out / "tokenizer"))
        streams = {domain: token_stream(tok, docs) for domain, docs in corpora.items()}
        timings["text_and_tokenizer"] = time.perf_counter() - t

        m = config.model
        spec = TinyMistralSpec(
            vocab_size=len(tok), hidden_size=m.hidden_size, intermediate_size=m.intermediate_size,
            num_hidden_layers=m.num_hidden_layers, num_attention_heads=m.num_attention_heads,
            num_key_value_heads=m.num_key_value_heads, max_position_embeddings=m.max_position_embeddings,
        )
        torch.manual_seed(config.seed)
        model = MistralForCausalLM(mistral_config(spec, vocab_size=len(tok)))
        n_params = sum(p.numel() for p in model.parameters())

        def stage(s) -> TrainSettings:
            return TrainSettings(steps=s.steps, lr=s.lr, batch_size=s.batch_size, block_size=s.block_size, warmup_steps=s.warmup_steps)

        t = time.perf_counter()
        say(f"world: pretraining the base ({n_params / 1e6:.2f} M parameters) on general medicine, {config.pretrain.steps} steps")
        trace = train(model, streams[GENERAL], stage(config.pretrain), seed=config.seed, desc="base / general")
        losses["base"] = {"first": trace[0], "last": sum(trace[-10:]) / len(trace[-10:])}
        _save(model, tok, out / "base", {"role": "base", "trained_on": [GENERAL]})
        timings["pretrain"] = time.perf_counter() - t
        base_state = {k: v.clone() for k, v in model.state_dict().items()}

        for i, specialty in enumerate(config.specialties):
            t = time.perf_counter()
            say(f"world: fine-tuning hospital {i + 1}/{len(config.specialties)} on {specialty}, {config.finetune.steps} steps")
            model.load_state_dict(base_state)
            trace = train(model, streams[specialty], stage(config.finetune), seed=config.seed + 100 + i, desc=f"hospital / {specialty}")
            losses[specialty] = {"first": trace[0], "last": sum(trace[-10:]) / len(trace[-10:])}
            _save(model, tok, out / "hospitals" / specialty, {"role": "hospital", "trained_on": [GENERAL, specialty]})
            timings[f"finetune_{specialty}"] = time.perf_counter() - t

        counts = {d.name: {split: len(d.split(split)) * len(RELATIONS) for split in SPLITS} for d in kb.domains}
        manifest = {
            "key": config.key(),
            "config": config.model_dump(mode="json"),
            "parameters": n_params,
            "vocab_size": len(tok),
            "tokens": {d: len(s) for d, s in streams.items()},
            "exam_items": counts,
            "losses": losses,
            "seconds": timings,
        }
        (out / "world.json").write_text(json.dumps(manifest, indent=2))


def _save(model, tokenizer, folder: Path, info: dict[str, Any]) -> None:
    model.save_pretrained(str(folder), safe_serialization=True)
    tokenizer.save_pretrained(str(folder))
    (folder / "demo-model.json").write_text(json.dumps(info, indent=2))
