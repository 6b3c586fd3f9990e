"""A small synthetic medical knowledge base, generated from a seed.

Each *domain* (general medicine, and one per specialty) holds conditions; each condition has one
presenting finding, one first-line drug and one contraindicated drug. Every name is made up from
syllables, so no model can know a fact from anywhere but our training text, and every value is
unique within its domain, so a question has exactly one right answer among same-domain choices.

A domain's conditions are split in two: the *test* conditions, asked by the exams the report
scores, and the *validation* conditions, asked only by the validation splits that choose between
candidate merges. Both are taught by the same training text; no condition is in both splits.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

GENERAL = "general"

# A fact is (condition, relation, value). The relations, in the order questions are asked:
RELATIONS = ("finding", "treatment", "contraindication")

_ONSETS = ["b", "d", "f", "g", "k", "l", "m", "n", "p", "r", "s", "t", "v", "z", "br", "cl", "dr", "gr", "pl", "st", "tr", "sk"]
_VOWELS = ["a", "e", "i", "o", "u", "ai", "ou", "ei"]
_CODAS = ["", "", "n", "r", "l", "s", "x", "m"]

_CONDITION_SUFFIX = ["itis", "osis", " syndrome", " disease", "emia", "opathy"]
_DRUG_SUFFIX = ["mab", "pril", "olol", "cillin", "azole", "statin", "parin", "tinib", "vir", "done"]
_MODIFIERS = ["sudden", "chronic", "painless", "nocturnal", "bilateral", "intermittent", "mild", "severe", "recurrent", "migrating"]
_SYMPTOMS = ["cough", "rash", "headache", "fever", "palpitations", "fatigue", "jaundice", "tremor", "wheeze", "swelling", "bruising", "numbness", "vomiting", "dizziness", "hoarseness", "itching"]


@dataclass(frozen=True)
class Condition:
    name: str
    finding: str
    treatment: str
    contraindication: str

    def value(self, relation: str) -> str:
        return getattr(self, relation)


SPLITS = ("test", "validation")


@dataclass(frozen=True)
class Domain:
    name: str
    conditions: tuple[Condition, ...]  # every condition the domain's text teaches, test ones first
    n_test: int  # conditions[:n_test] are asked by the test exam, the rest by validation

    def values(self, relation: str) -> list[str]:
        return [c.value(relation) for c in self.conditions]

    def split(self, name: str) -> list[tuple[int, Condition]]:
        """(index in ``conditions``, condition) of the test or the validation split."""
        if name not in SPLITS:
            raise KeyError(f"no split {name!r}; splits: {', '.join(SPLITS)}")
        chosen = range(self.n_test) if name == "test" else range(self.n_test, len(self.conditions))
        return [(i, self.conditions[i]) for i in chosen]


@dataclass(frozen=True)
class KnowledgeBase:
    domains: tuple[Domain, ...]

    def domain(self, name: str) -> Domain:
        for d in self.domains:
            if d.name == name:
                return d
        raise KeyError(f"no domain {name!r}; domains: {', '.join(d.name for d in self.domains)}")

    @property
    def specialties(self) -> list[str]:
        return [d.name for d in self.domains if d.name != GENERAL]


def build_knowledge(specialties: list[str], conditions_per_domain: int, seed: int, validation_per_domain: int = 0) -> KnowledgeBase:
    """Draw every name once across the whole base, so no name belongs to two facts.

    Each domain gets ``conditions_per_domain`` test conditions and ``validation_per_domain``
    validation conditions.
    """
    rng = random.Random(seed)
    used: set[str] = set()

    def fresh(make) -> str:
        for _ in range(10_000):
            name = make()
            if name not in used and not any(name in u or u in name for u in used):
                used.add(name)
                return name
        raise RuntimeError("ran out of synthetic names; lower conditions_per_domain")

    def word(n_syllables: int) -> str:
        return "".join(rng.choice(_ONSETS) + rng.choice(_VOWELS) + rng.choice(_CODAS) for _ in range(n_syllables))

    domains = []
    for domain_name in [GENERAL, *specialties]:
        conditions = []
        for _ in range(conditions_per_domain + validation_per_domain):
            conditions.append(
                Condition(
                    name=fresh(lambda: word(2) + rng.choice(_CONDITION_SUFFIX)),
                    finding=fresh(lambda: f"{rng.choice(_MODIFIERS)} {rng.choice(_SYMPTOMS)} with {word(2)} sign"),
                    treatment=fresh(lambda: word(2) + rng.choice(_DRUG_SUFFIX)),
                    contraindication=fresh(lambda: word(2) + rng.choice(_DRUG_SUFFIX)),
                )
            )
        domains.append(Domain(domain_name, tuple(conditions), n_test=conditions_per_domain))
    return KnowledgeBase(tuple(domains))
