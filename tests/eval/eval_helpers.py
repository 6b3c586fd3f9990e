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


# lm-eval's built-in task for each kind, and the split names its local copy gives to
# (the scored items, the few-shot examples).
BUILTIN_OF_KIND = {
    "medqa": ("medqa_4options", "test", "train"),
    "pubmedqa": ("pubmedqa", "test", "train"),
    "mmlu": ("mmlu_professional_medicine", "test", "dev"),
    "medmcqa": ("medmcqa", "validation", "train"),
    "hellaswag": ("hellaswag", "validation", "train"),
}
MMLU_DESCRIPTION = "The following are multiple choice questions (with answers) about professional medicine.\n\n"
HELLASWAG_ACTIVITY = "Health"


def parity_items(kind: str, n: int, seed: int = 0, prefix: str = "") -> list[dict]:
    """Items of ``kind`` that the kind's lm-eval task renders identically from hub columns:
    a HellaSwag context reads 'activity: context', as lm-eval's hellaswag builds its query."""
    items = make_items(kind, n, seed=seed, prefix=prefix)
    if kind == "hellaswag":
        items = [{**i, "question": f"{HELLASWAG_ACTIVITY}: {i['question']}"} for i in items]
    return items


def hub_row(kind: str, item: dict) -> dict:
    """One fedmerge item in the columns of the hub dataset lm-eval's built-in task reads."""
    q, choices, answer = item["question"], item["choices"], item["answer"]
    if kind == "medqa":
        return {"sent1": q, **{f"ending{k}": c for k, c in enumerate(choices)}, "label": answer}
    if kind == "pubmedqa":
        return {"QUESTION": q, "CONTEXTS": [item["context"]], "final_decision": choices[answer]}
    if kind == "mmlu":
        return {"question": q, "choices": choices, "answer": answer, "subject": "professional_medicine"}
    if kind == "medmcqa":
        return {"question": q, **{f"op{'abcd'[k]}": c for k, c in enumerate(choices)}, "cop": answer}
    if kind == "hellaswag":
        prefix = f"{HELLASWAG_ACTIVITY}: "
        assert q.startswith(prefix)
        return {"activity_label": HELLASWAG_ACTIVITY, "ctx_a": q[len(prefix):], "ctx_b": "", "endings": choices, "label": str(answer)}
    raise ValueError(kind)
