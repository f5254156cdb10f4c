"""``python -m scribblejax.cli``: the ``scribblejax`` command."""

import sys

from scribblejax.cli.main import main

sys.exit(main())
