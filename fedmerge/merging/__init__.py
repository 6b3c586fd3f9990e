"""Merging: pure tensor math, checkpoints and the streaming engine.

Owns reading and writing HF model folders, task vectors, the strategy registry, attention-head
alignment, the engine that streams tensors through a strategy, and the inspect report.
Never imports Flower, the network, ``fedmerge.security`` or ``fedmerge.eval``.
"""
