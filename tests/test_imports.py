"""Start-up imports (issue 16): `--help` of both commands answers without torch or the model
libraries, and a training run does not import trackers or image/plotting libraries it does not use."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
HEAVY = ("torch", "diffusers", "transformers", "peft", "datasets", "accelerate", "PIL", "matplotlib")


def loaded_after(code: str) -> set[str]:
    probe = code + "\nimport json, sys\nprint(json.dumps(sorted({m.split('.')[0] for m in sys.modules})))"
    proc = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, cwd=ROOT,
                          env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    return set(json.loads(proc.stdout.strip().splitlines()[-1]))


@pytest.mark.parametrize("module", ["trainer.cli", "trainer.prepare"])
def test_help_imports_no_heavy_library(module):
    modules = loaded_after(f"import contextlib, io\nfrom {module} import main\n"
                           "with contextlib.redirect_stdout(io.StringIO()), contextlib.suppress(SystemExit):\n"
                           "    main(['--help'])")
    assert not modules & set(HEAVY), modules & set(HEAVY)


def test_a_training_run_does_not_import_trackers_or_plotting():
    modules = loaded_after("import trainer.loop\nfrom trainer.models import load_model\nload_model('demo')")
    assert not modules & {"matplotlib", "tensorboard", "wandb", "torchvision"}
