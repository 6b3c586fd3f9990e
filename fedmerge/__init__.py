"""fedmerge: federated model merging for medical LLMs.

Parts (one folder each): ``merging`` (tensor math, checkpoints, streaming engine),
``security`` (keys, trust store, signed and sealed delta packages), ``eval`` (lm-eval based
evaluator, results store, plots), ``client`` and ``server`` (the Flower apps), ``demo``
(the miniature federation). ``merging``, ``security`` and ``eval`` never import Flower.
"""

__version__ = "0.1.0"
