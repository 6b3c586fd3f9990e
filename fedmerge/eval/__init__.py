"""Evaluation: lm-evaluation-harness runs, local task definitions, results store, reports, plots.

- ``tasks``: local JSONL tasks (five packaged kinds), their checks, built-in tasks from local copies
- ``config``: ``EvalConfig``
- ``evaluator``: ``Evaluator`` (tasks built once, re-seeded every round), ``EvalResult``
- ``store``: ``ResultsStore`` (SQLite, safe for concurrent appends)
- ``gate``: ``decide`` (pure) and ``Gate`` (decides with the store, records every decision)
- ``report`` / ``plots``: Table IV-shaped Markdown and PNG figures
- ``commands``: ``fedmerge eval`` and ``fedmerge report``

Never imports Flower or ``fedmerge.security``.
"""
