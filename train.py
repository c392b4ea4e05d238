"""Train a LoRA on a diffusion model: ``accelerate launch train.py [--config run.yaml] [--name VALUE ...]``.

With no arguments it trains the built-in demo. ``--help`` lists every parameter.
"""

import sys

from trainer.cli import main

if __name__ == "__main__":
    sys.exit(main())
