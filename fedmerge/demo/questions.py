"""Evaluation items: the knowledge base's facts asked in wordings that training never uses.

Items follow the evaluator's local multiple-choice format, ``{"id", "question", "choices",
"answer"}``, in its continuation (HellaSwag-style) kind: the ``question`` is the start of a
sentence and each choice is scored as its ending, the way a model this small can be asked at all
(lettered options need abilities it does not have). The sentence comes from ``EXAM_TEMPLATES``,
which are never used in the training text, so an item is answered only by having learned the
fact from *other* sentences, never by recalling the item.

Distractors are values of the same relation from the same domain, so word frequency or domain
vocabulary cannot pick the answer: only the link between the condition and its value can.
"""

from __future__ import annotations

import random

from fedmerge.demo.knowledge import RELATIONS, Domain

# Held-out wordings: none of these appears in ``corpus.STATEMENT_TEMPLATES``.
EXAM_TEMPLATES: dict[str, str] = {
    "finding": "On examination, a patient with {condition} is expected to have",
    "treatment": "Asked which medicine to start for {condition}, the doctor chose",
    "contraindication": "Because it is unsafe in {condition}, the pharmacist refused to dispense",
}


def exam_items(domain: Domain, n_choices: int, seed: int) -> list[dict]:
    """One item per (condition, relation); the distractors and the answer's position are seeded."""
    rng = random.Random(seed)
    items = []
    for relation in RELATIONS:
        pool = domain.values(relation)
        for i, cond in enumerate(domain.conditions):
            right = cond.value(relation)
            wrong = rng.sample([v for v in pool if v != right], n_choices - 1)
            answer = rng.randrange(n_choices)
            choices = wrong[:answer] + [right] + wrong[answer:]
            items.append(
                {
                    "id": f"{domain.name}-{relation}-{i:03d}",
                    "question": EXAM_TEMPLATES[relation].format(condition=cond.name),
                    "choices": choices,
                    "answer": answer,
                }
            )
    return items
