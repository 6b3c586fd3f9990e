"""Training text: every fact of a domain in declarative sentences, plus Q&A drills.

Every fact is stated in several declarative wordings. Questions are asked only about the
domain's *drilled* conditions, so the model learns how a question is put; the *examined*
conditions are never asked here, so an exam item can only be answered by having learned the
fact from its statements, not by having seen the item.
"""

from __future__ import annotations

import random

from fedmerge.demo.knowledge import RELATIONS, Domain
from fedmerge.demo.questions import QUESTION_TEMPLATES, qa_pair

STATEMENT_TEMPLATES: dict[str, tuple[str, ...]] = {
    "finding": (
        "{condition} presents with {value}.",
        "patients with {condition} usually show {value}.",
        "the classic finding in {condition} is {value}.",
        "{value} is the hallmark of {condition}.",
    ),
    "treatment": (
        "{condition} is treated with {value}.",
        "the first-line drug for {condition} is {value}.",
        "clinicians prescribe {value} for {condition}.",
        "{value} is given to patients with {condition}.",
    ),
    "contraindication": (
        "{value} is contraindicated in {condition}.",
        "patients with {condition} must never receive {value}.",
        "in {condition}, {value} is dangerous.",
        "{value} worsens {condition} and is withheld.",
    ),
}


def statements(domain: Domain) -> list[str]:
    """Every (fact, template) sentence of a domain, once each."""
    out = []
    for cond in domain.conditions:
        for relation in RELATIONS:
            for template in STATEMENT_TEMPLATES[relation]:
                out.append(template.format(condition=cond.name, value=cond.value(relation)))
    return out


def drills(domain: Domain) -> list[str]:
    """Every question template, answered, for the drilled conditions only."""
    out = []
    for cond in domain.drilled:
        for relation in RELATIONS:
            for template in QUESTION_TEMPLATES[relation]:
                out.append(qa_pair(template, cond.name, cond.value(relation)))
    return out


def domain_corpus(domain: Domain, passes: int, seed: int, sentences_per_paragraph: int = 8, pairs_per_drill: int = 4) -> list[str]:
    """``passes`` shuffled passes over the domain's statements and drills, cut into documents.

    Each pass visits every sentence and every drill once in a new order, so every fact is seen in
    every wording equally often and the neighbours of a sentence change from pass to pass.
    Drills are laid out as few-shot prompts are: Q&A pairs separated by blank lines.
    """
    rng = random.Random(seed)
    sentences, pairs = statements(domain), drills(domain)
    docs = []
    for _ in range(passes):
        rng.shuffle(sentences)
        rng.shuffle(pairs)
        docs += [" ".join(sentences[i : i + sentences_per_paragraph]) for i in range(0, len(sentences), sentences_per_paragraph)]
        docs += ["\n\n".join(pairs[i : i + pairs_per_drill]) for i in range(0, len(pairs), pairs_per_drill)]
    rng.shuffle(docs)
    return docs
