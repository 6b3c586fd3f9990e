"""Scoring a round's model and deciding whether it is published: ``evaluate_fn`` and ``gate_fn``.

The round loop takes both as plain callables, so a caller (a test, a study) can pass its own:

- ``evaluate_fn(round_id, model_dir) -> EvalResult`` scores the merged model;
- ``gate_fn(result) -> GateDecision`` decides, from those scores, whether it is published.

``from_config`` builds the two from the federation's ``evaluator`` section: the evaluator of
``fedmerge.eval`` on the section's eval config, and the gate of ``fedmerge.eval.gate`` on that
config's results store, with ``gate_metric``, ``gate_margin``... Every decision is recorded in
the store's ``gate_decisions`` table; the last published model there is what the next round is
held to. When the gate compares with the base model and the store has no score for it, the base
is scored once first.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING, Callable

from fedmerge.server.config import EvaluatorHook, FederationConfig
from fedmerge.server.errors import ServerError
from fedmerge.server.record import Evaluation, GateOutcome

if TYPE_CHECKING:  # lm-eval loads only when a round is scored
    from fedmerge.eval.evaluator import EvalResult
    from fedmerge.eval.gate import GateDecision

log = logging.getLogger(__name__)

EvaluateFn = Callable[[int, Path], "EvalResult"]
GateFn = Callable[["EvalResult"], "GateDecision"]


class ConfiguredEvaluation:
    """``evaluate_fn`` and ``gate_fn`` from an ``evaluator:`` section; tasks are built once and reused."""

    def __init__(self, hook: EvaluatorHook, config: FederationConfig):
        self.hook = hook
        self.cfg = config
        self._evaluator = None
        self._gate = None

    def _eval(self):
        if self._evaluator is None:
            from fedmerge.eval.config import EvalConfig
            from fedmerge.eval.evaluator import Evaluator

            self._evaluator = Evaluator(EvalConfig.from_yaml(self.hook.config_path))
        return self._evaluator

    def gate(self):
        if self._gate is None:
            from fedmerge.eval.gate import Gate

            ev = self._eval()
            if ev.store is None:
                raise ServerError(f"{self.hook.config_path}: the gate needs a results store (store: in the eval config) to find the last published model")
            self._gate = Gate(ev.store, self.hook.gate_config())
        return self._gate

    def evaluate(self, round_id: int, model_dir: Path):
        ev = self._eval()
        if self.hook.gate_compare_to in ("base", "both") and ev.store is not None and ev.store.latest_run(role="base") is None:
            log.info("scoring the base model once, for the gate to compare rounds with")
            ev.evaluate(str(self.cfg.base_model), label="base", role="base")
        return ev.evaluate(str(model_dir), round=round_id, label=f"round-{round_id}", role="merge",
                           strategy=self.cfg.strategy.method, params=self.cfg.strategy.parameters)  # fmt: skip

    def decide(self, result):
        return self.gate().check(result)


def evaluation_of(result) -> Evaluation:
    scores: dict[str, dict[str, float | None]] = {}
    for s in result.scores:
        scores.setdefault(s.task, {})[s.metric] = s.value
    return Evaluation(scores=scores, run_id=result.run_id, fingerprint=result.fingerprint, seconds=result.seconds)


def gate_outcome_of(decision) -> GateOutcome:
    return GateOutcome(publish=bool(decision.publish), reason=decision.reason, metric=decision.metric, score=decision.score,
                       reference=decision.reference, reference_kind=decision.reference_kind, margin=decision.margin)  # fmt: skip
