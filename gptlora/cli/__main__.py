"""``python -m gptlora.cli ARGS``: the ``gptlora`` command (also how ``torchrun -m gptlora.cli`` starts it)."""

import sys

from .app import main

sys.exit(main())
