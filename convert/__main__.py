"""``python -m convert`` runs the dsconv CLI."""

import sys

from .cli import main

sys.exit(main())
