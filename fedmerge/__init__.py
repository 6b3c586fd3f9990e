"""fedmerge: federated model merging for medical LLMs.

Parts (one folder each): ``merging`` (tensor math, checkpoints, streaming engine),
``security`` (keys, trust store, signed and sealed delta packages), ``eval`` (lm-eval based
evaluator, results store, plots), ``client`` and ``server`` (the Flower apps), ``demo``
(the miniature federation). ``merging``, ``security`` and ``eval`` never import Flower.
"""

import os as _os

# Idle OpenMP threads sleep instead of spinning. A federation's processes share CPUs (the
# coordinator's, its SuperLink's, each hospital's apps); torch's threads spinning in one of
# them take the cores the others need: rebuilding a 1.1 B-parameter model from its int4 delta
# cost 32 CPU s with spinning threads and 6 without, on a loaded 2-core machine, for the same
# result. OpenMP reads this once, when torch is first imported; a setting of the user's wins.
_os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

__version__ = "0.1.0"
