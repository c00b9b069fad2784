"""Test-only entry point: `python -m trainer.train` with one rank that hangs, for the hung-rank test in
tests/test_distributed_launch.py. Not part of scalesft: it wraps trainer.train.main unchanged and only adds a
callback, so the process group, the timeout and the error line under test are the production ones.

    accelerate launch ... -m hang_rank RECIPE [overrides]     (tests/ on PYTHONPATH)

The rank HANG_RANK (env SCALESFT_TEST_HANG_RANK, default 1) prints `[hang] rank R hangs after step N at T`
(T: epoch seconds) at the end of optimizer step HANG_STEP and then sleeps, while the other ranks go on into
the next step's collectives (DDP's gradient all-reduce) and wait for it.
"""

from __future__ import annotations

import os
import sys
import time

from transformers import TrainerCallback

import scalesft.trainer.train as entry

HANG_STEP = 2


class Hang(TrainerCallback):
    def on_step_end(self, args, state, control, **kwargs):
        rank = int(os.environ.get("RANK", "0"))
        if state.global_step == HANG_STEP and rank == int(os.environ.get("SCALESFT_TEST_HANG_RANK", "1")):
            print(f"[hang] rank {rank} hangs after step {state.global_step} at {time.time():.3f}", flush=True)
            time.sleep(3600)  # like a rank stuck in a kernel: the launcher's SIGTERM does not end it
        return control


def main(argv: list[str] | None = None) -> int:
    real = entry.train
    entry.train = lambda recipe, **kw: real(recipe, callbacks=[Hang(), *kw.pop("callbacks", ())], **kw)
    return entry.main(argv)


if __name__ == "__main__":
    sys.exit(main())
