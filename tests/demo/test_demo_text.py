"""The world's text and exams: every fact is taught, no exam item is ever seen in training."""

from __future__ import annotations

import pytest

from fedmerge.demo.config import DemoConfig, WorldConfig, load_demo_config
from fedmerge.demo.corpus import TEMPLATES, held_out
from fedmerge.demo.knowledge import GENERAL, RELATIONS
from fedmerge.demo.questions import exam_items
from fedmerge.demo.world import corpora_of, knowledge_of
from fedmerge.eval.tasks import check_item

CONFIGS = {"default": DemoConfig().world, "small": load_demo_config("configs/demo-small.yaml").world}


@pytest.fixture(scope="module", params=list(CONFIGS))
def world_text(request):
    cfg: WorldConfig = CONFIGS[request.param]
    kb = knowledge_of(cfg)
    corpora = corpora_of(cfg, kb)
    items = {d.name: exam_items(d, cfg.n_choices, seed=7) for d in kb.domains}
    return cfg, kb, corpora, items


def test_no_exam_item_appears_in_any_training_text(world_text):
    cfg, kb, corpora, items = world_text
    text = "\n".join(doc for docs in corpora.values() for doc in docs)
    validation = {d.name: exam_items(d, cfg.n_choices, seed=7, split="validation") for d in kb.domains}
    n = 0
    for domain_items in [*items.values(), *validation.values()]:
        for it in domain_items:
            answer = it["choices"][it["answer"]]
            assert it["question"] not in text  # the held-out wording of this fact, with its condition
            assert f"{it['question']} {answer}" not in text
            n += 1
    assert n == sum(len(d.conditions) for d in kb.domains) * len(RELATIONS)


def test_each_fact_is_taught_in_its_other_wordings_in_its_own_domain_only(world_text):
    _, kb, corpora, _ = world_text
    for domain in kb.domains:
        own = "\n".join(corpora[domain.name])
        others = "\n".join(doc for name, docs in corpora.items() if name != domain.name for doc in docs)
        for i, cond in enumerate(domain.conditions):
            for relation in RELATIONS:
                for k, template in enumerate(TEMPLATES[relation]):
                    sentence = template.format(condition=cond.name, value=cond.value(relation))
                    assert (sentence in own) == (k != held_out(i, relation))
                assert cond.name not in others and cond.value(relation) not in others


def test_every_exam_wording_is_taught_with_other_conditions(world_text):
    _, kb, corpora, _ = world_text
    for domain in kb.domains:
        for relation in RELATIONS:
            held = [held_out(i, relation) for i in range(len(domain.conditions))]
            for k in range(len(TEMPLATES[relation])):
                assert k in held and held.count(k) < len(held)  # asked for some, taught for the rest


def test_items_fit_the_evaluator_and_have_one_right_answer(world_text):
    cfg, kb, _, items = world_text
    for domain in kb.domains:
        for relation in RELATIONS:
            values = domain.values(relation)
            assert len(set(values)) == len(values)
        for i, it in enumerate(items[domain.name]):
            check_item(it, "hellaswag", "demo", i)
            assert len(it["choices"]) == cfg.n_choices == len(set(it["choices"]))
            _, split, relation, index = it["id"].split("-")
            assert split == "test"
            assert set(it["choices"]) <= set(domain.values(relation))  # same domain, same relation
            cond = domain.conditions[int(index)]
            assert it["choices"][it["answer"]] == cond.value(relation) and cond.name in it["question"]


def test_answer_positions_are_spread():
    cfg = CONFIGS["default"]
    kb = knowledge_of(cfg)
    answers = [it["answer"] for d in kb.domains for it in exam_items(d, cfg.n_choices, seed=3)]
    counts = [answers.count(k) for k in range(cfg.n_choices)]
    assert min(counts) >= len(answers) / cfg.n_choices / 2, counts


def test_seeds_reproduce_and_differ():
    cfg = CONFIGS["small"]
    a, b = knowledge_of(cfg), knowledge_of(cfg)
    assert a == b
    assert corpora_of(cfg, a) == corpora_of(cfg, b)
    other = knowledge_of(cfg.model_copy(update={"seed": cfg.seed + 1}))
    assert other != a
    names_a = {c.name for d in a.domains for c in d.conditions}
    names_other = {c.name for d in other.domains for c in d.conditions}
    assert len(names_a & names_other) < len(names_a) / 2
    assert [d.name for d in a.domains] == [GENERAL, *cfg.specialties]




def test_validation_items_share_nothing_with_the_test_exams(world_text):
    """Disjoint by item id, by condition and by answer: a validation score reads no test item."""
    cfg, kb, corpora, test_items = world_text
    for domain in kb.domains:
        val = exam_items(domain, cfg.n_choices, seed=11, split="validation")
        test = test_items[domain.name]
        assert len(val) == cfg.validation_conditions * len(RELATIONS) and len(test) == cfg.conditions_per_domain * len(RELATIONS)
        assert not {it["id"] for it in val} & {it["id"] for it in test}
        assert not {it["question"] for it in val} & {it["question"] for it in test}
        test_conditions = {c.name for _, c in domain.split("test")}
        test_words = test_conditions | {c.value(r) for _, c in domain.split("test") for r in RELATIONS}
        for it in val:
            assert not any(name in it["question"] for name in test_conditions)
            assert not set(it["choices"]) & test_words  # not even a distractor comes from the test split
        # validation facts are taught like test facts, in their other wordings, in their domain's text only
        text = "\n".join(corpora[domain.name])
        for i, cond in domain.split("validation"):
            assert cond.name in text and i >= cfg.conditions_per_domain


def test_world_writes_disjoint_validation_tasks_and_hospital_eval_configs(tmp_path):
    """The task files a built world holds: each hospital's split is general + its specialty, none is a test item."""
    from fedmerge.demo.world import CONSORTIUM, World, _ensure_tasks, validation_task_name, write_validation_config
    from fedmerge.eval.config import EvalConfig
    from fedmerge.eval.tasks import read_jsonl

    cfg = CONFIGS["small"]
    root = tmp_path / "world"
    world = World(root=root, base=root / "base", hospitals={s: root / "hospitals" / s for s in cfg.specialties},
                  tasks_dir=root / "tasks", domains=[GENERAL, *cfg.specialties], manifest={"config": cfg.model_dump(mode="json")})
    _ensure_tasks(world)
    test_ids = {it["id"] for t in world.task_names for it in read_jsonl(world.tasks_dir / f"{t}.jsonl")}
    assert len(test_ids) == len(world.task_names) * cfg.conditions_per_domain * len(RELATIONS)
    for holder in [*cfg.specialties, CONSORTIUM]:
        folder = world.validation_dir(holder)
        names = world.validation_tasks(holder)
        assert sorted(p.stem for p in folder.glob("*.yaml")) == sorted(names)
        expected = [GENERAL, *cfg.specialties] if holder == CONSORTIUM else [GENERAL, holder]
        assert names == [validation_task_name(d) for d in expected]
        for name in names:
            ids = {it["id"] for it in read_jsonl(folder / f"{name}.jsonl")}
            assert ids and not ids & test_ids
        ev = EvalConfig.from_yaml(write_validation_config(world, holder, tmp_path / f"{holder}.yaml", num_fewshot=0, batch_size=8, seed=1))
        assert ev.tasks == names and [p.resolve() for p in ev.task_dirs] == [folder.resolve()] and ev.store is None
