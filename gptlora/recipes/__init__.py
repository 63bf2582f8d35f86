"""Whole runs built from the chapters, each writing a run directory: spam fine-tuning with any method
(``finetune``), pretraining on a text (``pretrain_run``), instruction fine-tuning (``instruct_run``,
through ``pretrain_run``), the frozen-prefix cache that speeds up last-blocks training (``prefix_cache``)
and the seven-method comparison (``method_comparison``).
What the runs share: their settings dataclasses, checked once (``settings``), and their run
directories (``run_dir``: the base a run records, the files it owns, the fingerprint of frozen weights).
"""
