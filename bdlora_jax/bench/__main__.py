"""Entry point of `python -m bdlora_jax.bench <subcommand> ...`."""

import sys

from .cli import main

sys.exit(main())
