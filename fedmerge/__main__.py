"""``python -m fedmerge``: the same command line as the ``fedmerge`` script."""

import sys

from fedmerge.cli import main

sys.exit(main())
