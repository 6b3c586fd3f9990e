"""Training text: every fact of a domain, stated in several declarative wordings.

The exam (``questions``) asks the same facts in wordings that are not among these, so a model
answers an exam item only by having learned the fact, never by having seen the item.
"""

from __future__ import annotations

import random

from fedmerge.demo.knowledge import RELATIONS, Domain

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


def domain_corpus(domain: Domain, passes: int, seed: int, sentences_per_paragraph: int = 8) -> list[str]:
    """``passes`` shuffled passes over the domain's statements, cut into paragraphs (documents).

    Each pass visits every sentence once in a new order, so every fact is seen in every wording
    equally often and the neighbours of a sentence change from pass to pass.
    """
    rng = random.Random(seed)
    sentences = statements(domain)
    docs = []
    for _ in range(passes):
        rng.shuffle(sentences)
        docs += [" ".join(sentences[i : i + sentences_per_paragraph]) for i in range(0, len(sentences), sentences_per_paragraph)]
    return docs
