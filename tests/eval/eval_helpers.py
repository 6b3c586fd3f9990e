"""Seeded local items of every task kind, for the evaluator's tests and benchmark."""

from __future__ import annotations

import random

DRUGS = ["aspirin", "metformin", "propranolol", "chemotherapy", "insulin", "morphine", "heparin", "amoxicillin"]
FINDINGS = ["chest pain", "fever and rash", "shortness of breath", "type two diabetes", "asthma", "a tumour"]


def make_items(kind: str, n: int, seed: int = 0, prefix: str = "") -> list[dict]:
    """``n`` well-formed items of ``kind`` (contract 4), the same for the same seed."""
    rnd = random.Random(f"{kind}:{seed}")
    items = []
    for i in range(n):
        finding = rnd.choice(FINDINGS)
        if kind == "pubmedqa":
            items.append({
                "id": f"{prefix}{kind}-{i}",
                "question": f"does {rnd.choice(DRUGS)} help a patient with {finding}?",
                "context": f"the patient presents with {finding}. {rnd.choice(DRUGS)} is given and the tumour was staged.",
                "choices": ["yes", "no", "maybe"],
                "answer": rnd.randrange(3),
            })
        elif kind == "hellaswag":
            endings = rnd.sample([f"{d} is given." for d in DRUGS], 4)
            items.append({
                "id": f"{prefix}{kind}-{i}",
                "question": f"a child with {finding} is seen and",
                "choices": endings,
                "answer": rnd.randrange(4),
            })
        else:
            items.append({
                "id": f"{prefix}{kind}-{i}",
                "question": f"which drug is first line for {finding} in case {i}?",
                "choices": rnd.sample(DRUGS, 4),
                "answer": rnd.randrange(4),
            })
    return items


KINDS = ("medqa", "pubmedqa", "mmlu", "medmcqa", "hellaswag")
ITEMS_PER_TASK = 6
SHOTS = 2
SEED = 1234
