"""Candidate selection: the published model chosen among candidate merges by validation scores.

With ``selection: {mode: central | federated, ...}`` in the federation config, a round whose
contributions are settled builds K candidate merges (``candidates``), has them scored on
validation data, never on test items (``central``: the coordinator's evaluator on the
consortium's validation split; ``federated``: each contributing hospital on its own, returning
only accuracies), picks one by the configured rule (``rule``) and hands it to the evaluator and
the gate as the round's model (``stage``).

- ``rule``: ``choose`` (pure: score table -> chosen candidate, values, reason)
- ``candidates``: building candidate merges and their signed delta packages
- ``central`` / ``federated``: the two ways of scoring
- ``stage``: ``SelectionStage``, the round loop's stage (build, score, choose, promote)
"""

from fedmerge.server.selection.rule import Choice, choose
from fedmerge.server.selection.stage import SelectionStage

__all__ = ["Choice", "SelectionStage", "choose"]
