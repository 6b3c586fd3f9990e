"""Merging: pure tensor math, checkpoints and the streaming engine.

Owns the contract every merge input meets (``source``: ``DeltaSource``), task vectors
(``taskvector``, ``lora``, ``adapted``), the strategy registry, attention-head
alignment, the engine that streams tensors through a strategy following a layout (``engine``,
``layout``), merge configs in fedmerge's and mergekit's formats (``mergeconfig``,
``mergekit_format``, ``multimerge``), output vocabularies (``vocab``), what an output folder holds
beside its weights (``outputs``) and the inspect report.
Never imports Flower, the network, ``fedmerge.security`` or ``fedmerge.eval``.
"""
