"""``python -m scribblejax.cli``: the ``scribblejax`` command."""

import sys

from scribblejax.cli.entry import main

sys.exit(main())
