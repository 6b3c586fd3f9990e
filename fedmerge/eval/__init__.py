"""Evaluation: lm-evaluation-harness runs, local task definitions, results store, reports, plots.

Never imports Flower or ``fedmerge.security``.
"""
