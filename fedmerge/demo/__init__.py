"""The demo: the paper's experiment in miniature, built and run on a laptop CPU.

A seeded synthetic knowledge base (``knowledge``) is written out as declarative training text
(``corpus``) and as multiple-choice questions in other words (``questions``). A tiny Mistral is
pretrained on the general-medicine text and fine-tuned once per hospital on its specialty
(``training``, ``world``); the hospitals then contribute through a simulated federation and every
merge strategy is scored by the evaluator (``run``).

This package may import every other part of fedmerge; nothing else imports it.
"""
