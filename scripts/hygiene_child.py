"""Child for scripts/hygiene.py: live a moment, exit 1 (a crash), so `ckptd run` restarts it."""

import sys
import time

time.sleep(0.02)
sys.exit(1)
