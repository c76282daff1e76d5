"""``python -m csp_compile`` runs the ``csp-compile`` command line."""

import sys

from csp_compile.cli import main

sys.exit(main())
