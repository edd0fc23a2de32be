"""Lightning's own checkpointing and ckptd's callback, stopped by SIGTERM at the same step, side by side.

    python benchmarks/side_by_side_lightning.py [--stop-step 10] [--every 6]

Both run tests/fixtures/lightning_trainer.py (3 epochs of 6 steps, a validation after each), plainly (no
supervisor), each saving every ``--every`` steps: ``native`` with ``ModelCheckpoint(every_n_train_steps, save_last)``
and resumed with ``trainer.fit(ckpt_path="last")``, ``ckptd`` with ``CkptdCallback(every_n_train_steps)``. Each
gets SIGTERM after step ``--stop-step``, is run again to the end, and is compared with an uninterrupted run:
exit status of the stopped run, seconds from the signal to its exit, the step the rerun started from (steps
lost = stop step - that), and whether it ended bit-identical (parameters, optimizer state, learning rate).
"""

from __future__ import annotations

import os
import sys

from _side_by_side import compare  # benchmarks/ is on sys.path

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "tests", "fixtures", "lightning_trainer.py")
ENV = {k: v for k, v in os.environ.items() if not k.startswith("CKPTD_")} | {"PYTHONWARNINGS": "ignore"}

if __name__ == "__main__":
    sys.exit(compare(SCRIPT, ENV))
