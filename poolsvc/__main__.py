"""``python -m poolsvc``: the same command line as the ``poolsvc`` script."""
import sys

from .cli import main

sys.exit(main())
