"""Evaluation items: each fact asked in the one wording its training text leaves out.

Items follow the evaluator's local multiple-choice format, ``{"id", "question", "choices",
"answer"}``, in its continuation (HellaSwag-style) kind: the ``question`` is the held-out wording
up to the value and each choice is scored as its ending, the way a model this small can be asked
at all (lettered options need abilities it does not have). See ``corpus`` for how wordings are
held out: the item itself never appears in training text.

Distractors are values of the same relation from the same domain and the same split, so word
frequency or domain vocabulary cannot pick the answer (only the link between the condition and
its value can), and a validation item names nothing of the test split: not its conditions, not
its answers.
"""

from __future__ import annotations

import random

from fedmerge.demo.corpus import TEMPLATES, held_out
from fedmerge.demo.knowledge import RELATIONS, Domain


def exam_prompt(index: int, condition: str, relation: str) -> str:
    """The held-out wording of a fact, cut just before its value."""
    template = TEMPLATES[relation][held_out(index, relation)]
    return template.split("{value}")[0].rstrip().format(condition=condition)


def exam_items(domain: Domain, n_choices: int, seed: int, split: str = "test") -> list[dict]:
    """One item per (condition of ``split``, relation); distractors and answer positions are seeded.

    Item ids name the domain, the split, the relation and the condition's index in the domain, so
    an id never occurs in two splits.
    """
    rng = random.Random(seed)
    conditions = domain.split(split)
    items = []
    for relation in RELATIONS:
        pool = [c.value(relation) for _, c in conditions]
        for i, cond in conditions:
            right = cond.value(relation)
            wrong = rng.sample([v for v in pool if v != right], n_choices - 1)
            answer = rng.randrange(n_choices)
            choices = wrong[:answer] + [right] + wrong[answer:]
            items.append(
                {
                    "id": f"{domain.name}-{split}-{relation}-{i:03d}",
                    "question": exam_prompt(i, cond.name, relation),
                    "choices": choices,
                    "answer": answer,
                }
            )
    return items
