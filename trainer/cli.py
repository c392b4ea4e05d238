"""``train.py`` / ``lora-train``: parse the parameters, run, and turn input errors into one line."""

from __future__ import annotations

import logging
import os
import sys

from .config import parse_args
from .errors import ConfigError, TrainerError


def configure_logging() -> None:
    """INFO on the main process, errors only on the others (accelerate launch / torchrun set RANK)."""
    main_process = int(os.environ.get("RANK", "0")) == 0
    logging.basicConfig(level=logging.INFO if main_process else logging.ERROR,
                        format="%(levelname)s %(name)s: %(message)s")


#: exit codes (README, "When things go wrong"): a bad parameter, bad input or a failed write,
#: interrupted before training started (128 + SIGINT, as a shell reports Ctrl-C)
EXIT_CONFIG, EXIT_INPUT, EXIT_INTERRUPTED = 2, 1, 130


def main(argv: list[str] | None = None) -> int:
    try:
        return _main(argv)
    except KeyboardInterrupt:
        # Ctrl-C while loading (training itself turns it into "checkpoint and stop", exit 0)
        print("train.py: interrupted before training started; nothing was written", file=sys.stderr)
        return EXIT_INTERRUPTED


def _main(argv: list[str] | None) -> int:
    try:
        cfg = parse_args(argv)
    except ConfigError as e:
        if int(os.environ.get("RANK", "0")) == 0:  # the same on every process of a launch: say it once
            print(f"train.py: error: {e}", file=sys.stderr)
        return EXIT_CONFIG
    configure_logging()
    from .loop import train  # heavy imports (torch, diffusers) only after the parameters are valid

    try:
        result = train(cfg, handle_signals=True)
    except TrainerError as e:
        print(f"train.py: error: {e}", file=sys.stderr)
        return EXIT_INPUT
    if result.lora_path is not None:
        print(f"trained {result.steps} steps, final loss {result.loss['loss'][-1]:.4f}")
        print(f"wrote {result.lora_path} and loss.json, loss.png, result.json in {result.lora_path.parent}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
