"""`python -m rlhf.compare CONFIG --run NAME --outcome FILE`: one run of a comparison in a process of its own (what
`rlhf compare` starts for each run)."""

import sys

from rlhf.compare.runner import run_one_main

sys.exit(run_one_main(sys.argv[1:]))
