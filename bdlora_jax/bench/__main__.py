"""Entry point of `python -m bdlora_jax.bench <subcommand> ...`."""

import sys

from ..host_memory import keep_freed_memory

keep_freed_memory()  # before the subcommands import numpy, whose threads would take malloc arenas of their own

from .cli import main

sys.exit(main())
