"""Test helper run under `accelerate launch`: the trainer CLI, with one rank failing at its 2nd micro-batch."""

import os
import sys

import trainer.loop

FAIL_RANK = int(os.environ["FAIL_RANK"])
_real_step = trainer.loop.train_step
_calls = 0


def failing_step(*args, **kwargs):
    global _calls
    _calls += 1
    if int(os.environ.get("RANK", "0")) == FAIL_RANK and _calls == 2:
        raise RuntimeError(f"injected failure on rank {FAIL_RANK}")
    return _real_step(*args, **kwargs)


trainer.loop.train_step = failing_step

from trainer.cli import main

sys.exit(main())
