"""Superseded by ``csp-compile bench``; kept so that old commands still run.

    python benchmarks/decode_step_ratio.py --prompt 2048 --threads 1

runs ``csp-compile bench --long-prompt 2048 --threads 1``: the old ``--prompt`` (the decode prompt)
is the bench's ``--long-prompt``; every other argument goes to ``csp-compile bench`` unchanged. The
decode figures are ``decode_speedup_b20`` and ``decode_bound_b20`` (see ``csp-compile bench --help``).
"""

import sys

from csp_compile.cli import main

if __name__ == "__main__":
    sys.exit(main(["bench", *("--long-prompt" if arg == "--prompt" else arg for arg in sys.argv[1:])]))
