"""The ``gptlora`` command: ``app`` builds the parser and runs the subcommands, ``checks`` holds every
check of an option's value (run while parsing) and the one-line error and warning format,
``run_arguments`` the options the training commands share (model, LoRA, virtual tokens, appendix D),
``run_settings`` turns a parsed command line (resumed or not) into a run's settings dataclass, and
``instruct`` holds the ``instruct`` and ``score`` subcommands and ``generate --instruction``.

``python -m gptlora.cli`` runs it as the ``gptlora`` script does.
"""
