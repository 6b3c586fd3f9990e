"""Evaluation items: the knowledge base's facts asked as multiple-choice questions.

Items follow the evaluator's local multiple-choice format,
``{"id", "question", "choices", "answer"}``, in its continuation (HellaSwag-style) kind: the
``question`` is the whole prompt and each choice is scored as its continuation, the way a small
model can be asked at all (lettered options need abilities a model this size does not have).
Distractors are values of the same relation from the same domain, so word frequency or domain
vocabulary alone cannot pick the answer: only the link between the condition and its value can.

Exam items ask about the domain's *examined* conditions only; the *drilled* conditions give the
few-shot examples (and their Q&A are in the training text, the way real models see other QA).
"""

from __future__ import annotations

import random

from fedmerge.demo.knowledge import RELATIONS, Domain

QUESTION_TEMPLATES: dict[str, tuple[str, ...]] = {
    "finding": (
        "What finding is typical of {condition}?",
        "A patient with {condition} is most likely to show which finding?",
    ),
    "treatment": (
        "Which drug should be started first for {condition}?",
        "What is the first choice of medication in {condition}?",
    ),
    "contraindication": (
        "Which drug must be avoided in a patient with {condition}?",
        "What medication is unsafe for someone with {condition}?",
    ),
}


def prompt(question: str) -> str:
    """How a question is put to the model, in evaluation and in the training drills alike."""
    return f"Question: {question}\nAnswer:"


def qa_pair(template: str, condition: str, value: str) -> str:
    """A drilled question with its answer, as it appears in the training text."""
    return f"{prompt(template.format(condition=condition))} {value}"


def exam_items(domain: Domain, n_choices: int, seed: int) -> list[dict]:
    """The evaluation set: one item per (examined condition, relation)."""
    return _items(domain, domain.examined, n_choices, seed, "exam")


def fewshot_items(domain: Domain, n_choices: int, seed: int) -> list[dict]:
    """Few-shot examples, from the drilled conditions only."""
    return _items(domain, domain.drilled, n_choices, seed + 1, "shot")


def _items(domain: Domain, conditions, n_choices: int, seed: int, kind: str) -> list[dict]:
    """The template and the answer's position are seeded."""
    rng = random.Random(seed)
    items = []
    for relation in RELATIONS:
        pool = domain.values(relation)
        for i, cond in enumerate(conditions):
            right = cond.value(relation)
            wrong = rng.sample([v for v in pool if v != right], n_choices - 1)
            answer = rng.randrange(n_choices)
            choices = wrong[:answer] + [right] + wrong[answer:]
            template = rng.choice(QUESTION_TEMPLATES[relation])
            items.append(
                {
                    "id": f"{domain.name}-{kind}-{relation}-{i:03d}",
                    "question": prompt(template.format(condition=cond.name)),
                    "choices": choices,
                    "answer": answer,
                }
            )
    return items
