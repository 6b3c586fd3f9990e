"""Training text: every fact of a domain, in every wording but the one its exam item uses.

Each relation has a few wordings (``TEMPLATES``), declarative and one in question-and-answer
form, all ending with the value. For every fact one wording is *held out* (``held_out``, a
rotation, so each wording is held out for some conditions and taught for the others): the
training text states the fact in all its other wordings, and the exam (``questions``) asks it in
the held-out one. A model therefore meets each exam wording in training, with other conditions,
and each exam fact, in other words, but never the exam item itself.
"""

from __future__ import annotations

import random

from fedmerge.demo.knowledge import RELATIONS, Domain

TEMPLATES: dict[str, tuple[str, ...]] = {
    "finding": (
        "{condition} presents with {value}.",
        "patients with {condition} usually show {value}.",
        "the classic finding in {condition} is {value}.",
        "Question: What finding is typical of {condition}? Answer: {value}.",
    ),
    "treatment": (
        "{condition} is treated with {value}.",
        "the first-line drug for {condition} is {value}.",
        "for {condition}, clinicians prescribe {value}.",
        "Question: Which drug should be started first for {condition}? Answer: {value}.",
    ),
    "contraindication": (
        "in {condition}, never give {value}.",
        "patients with {condition} must never receive {value}.",
        "a drug contraindicated in {condition} is {value}.",
        "Question: Which drug must be avoided in {condition}? Answer: {value}.",
    ),
}


def held_out(index: int, relation: str) -> int:
    """Which wording of condition number ``index``'s fact is kept for the exam."""
    return (index + RELATIONS.index(relation)) % len(TEMPLATES[relation])


def statements(domain: Domain) -> list[str]:
    """Every taught (fact, wording) sentence of a domain, once each."""
    out = []
    for i, cond in enumerate(domain.conditions):
        for relation in RELATIONS:
            for k, template in enumerate(TEMPLATES[relation]):
                if k != held_out(i, relation):
                    out.append(template.format(condition=cond.name, value=cond.value(relation)))
    return out


def domain_corpus(domain: Domain, passes: int, seed: int, sentences_per_paragraph: int = 8) -> list[str]:
    """``passes`` shuffled passes over the domain's statements, cut into paragraphs (documents).

    Each pass visits every sentence once in a new order, so every fact is seen in every taught
    wording equally often and the neighbours of a sentence change from pass to pass.
    """
    rng = random.Random(seed)
    sentences = statements(domain)
    docs = []
    for _ in range(passes):
        rng.shuffle(sentences)
        docs += [" ".join(sentences[i : i + sentences_per_paragraph]) for i in range(0, len(sentences), sentences_per_paragraph)]
    return docs
