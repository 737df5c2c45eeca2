"""``python -m fxflatten.cli``: the same as the ``fxflatten`` command."""

import sys

from fxflatten.cli.main import main

sys.exit(main())
