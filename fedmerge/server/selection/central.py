"""Scoring candidates at the coordinator, on the consortium's validation split (``mode: central``).

``validate_fn(round_id, candidate_id, model_dir) -> {task: accuracy}`` scores one candidate. The
default is fedmerge's evaluator on ``selection.eval_config`` (tasks built once, reused for every
candidate and round; scores appended to that config's results store). A caller may pass its own
to ``RoundRunner``. Scores are recorded candidate by candidate, so a restarted coordinator
scores only the candidates it had not scored yet.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Callable, Mapping

from fedmerge.protocol import is_accuracy
from fedmerge.server.ledger import RoundJournal
from fedmerge.server.record import CENTRAL_SCORER, EventKind, ScoreFailure

log = logging.getLogger(__name__)

ValidateFn = Callable[[int, str, Path], Mapping[str, float]]


class ConfiguredValidation:
    """The default ``validate_fn``: the evaluator on the consortium's validation eval config."""

    def __init__(self, eval_config: str):
        self.eval_config = eval_config
        self._evaluator = None

    def __call__(self, round_id: int, candidate: str, model_dir: Path) -> dict[str, float]:
        if self._evaluator is None:
            from fedmerge.eval.config import EvalConfig
            from fedmerge.eval.evaluator import Evaluator

            self._evaluator = Evaluator(EvalConfig.from_yaml(self.eval_config))
        result = self._evaluator.evaluate(str(model_dir), round=round_id, label=f"round-{round_id}-{candidate}", role="merge")
        return result.accuracies("acc")


def checked_accuracies(scores: Mapping[str, float], who: str) -> dict[str, float]:
    """``scores`` as {task: accuracy}, refused unless every value is an accuracy in [0, 1]."""
    if not scores:
        raise ValueError(f"{who} returned no accuracy (do the validation tasks report acc?)")
    out = {}
    for task, value in scores.items():
        if not is_accuracy(value):
            raise ValueError(f"{who}: task {task!r} scored {value!r}, not an accuracy in [0, 1]")
        out[str(task)] = float(value)
    return out


class CentralScoring:
    """Every candidate not yet scored, scored by ``validate_fn``; a failure drops the central scorer."""

    def __init__(self, journal: RoundJournal, validate_fn: ValidateFn):
        self.journal = journal
        self.record = journal.record
        self.validate_fn = validate_fn

    def run(self) -> None:
        sel = self.record.selection
        assert sel is not None
        r = self.record.round
        done = dict(sel.scores.get(CENTRAL_SCORER, {}))
        sel.asked = [CENTRAL_SCORER]
        sel.failures = [f for f in sel.failures if f.scorer != CENTRAL_SCORER]  # a restart tries again
        for c in sel.candidates:
            if c.id in done:
                log.info("round %d: candidate %s already scored centrally (before a restart); not scored again", r, c.id)
                continue
            try:
                done[c.id] = checked_accuracies(self.validate_fn(r, c.id, Path(c.model_dir)), f"the central evaluator on {c.id}")
            except Exception as exc:  # an evaluator crash must not lose the round: recorded, then the fallback
                reason = f"{c.id}: {type(exc).__name__}: {exc}"[:600]
                log.error("round %d: central validation failed: %s", r, reason)
                sel.failures.append(ScoreFailure(scorer=CENTRAL_SCORER, reason=reason))
                self.journal.emit(EventKind.NOT_SCORED, institution=CENTRAL_SCORER, detail=reason)
                return
            sel.scores[CENTRAL_SCORER] = dict(done)
            self.journal.save()
            log.info("round %d: candidate %s scored centrally: %s", r, c.id, _accs(done[c.id]))
        self.journal.emit(EventKind.SCORED, institution=CENTRAL_SCORER, detail=f"{len(done)} candidate(s)")


def _accs(scores: Mapping[str, float]) -> str:
    return ", ".join(f"{t} {v:.4f}" for t, v in sorted(scores.items()))
