"""Evaluation: lm-evaluation-harness runs, local task definitions, results store, reports, plots.

- ``lmeval``: the one module that talks to lm-eval (version check, task index, model class, runs)
- ``tasks``: local JSONL tasks (five packaged kinds), their checks, the task YAML forms
- ``builtin``: lm-eval's built-in medical tasks pointed at local copies of their datasets
- ``catalog``: ``TaskCatalog``, the tasks an evaluator can build (found by lm-eval's TaskManager)
- ``config``: ``EvalConfig``
- ``evaluator``: ``Evaluator`` (tasks built once, re-seeded every round), ``EvalResult``
- ``store``: ``ResultsStore`` (SQLite, safe for concurrent appends)
- ``gate``: ``decide`` (pure) and ``Gate`` (decides with the store, records every decision)
- ``report`` / ``plots``: tables and figures per group of runs measured with the same settings
- ``commands``: ``fedmerge eval`` and ``fedmerge report``

Never imports Flower or ``fedmerge.security``.
"""
