#!/usr/bin/env bash
# The chaos tests at their long sizes: the tests marked `chaos` (kills at random moments of saves, prunes and
# supervisors; random rank kills of sharded saves; random supervisor events; syscall faults; power loss; bit
# rot) with CKPTD_TEST_LONG=1, which makes each bounded run as long as it was before CI ran a shorter one
# (tests/fixtures/long_runs.py). Not part of CI. Extra arguments go to pytest (-n 4, -k sharded, ...).
# The much longer runs whose figures docs/reliability.md reports are the scripts themselves (--count).
#
#   scripts/stress.sh                 # about 15 minutes on 2 cores
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}
CKPTD_TEST_LONG=1 exec "$PYTHON" -m pytest -q -n 2 -m chaos -p no:cacheprovider "$@"
