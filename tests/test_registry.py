"""The family registry (issue 15): every package under trainer/models/ is a family, found without
editing any other file; no family imports another; the choices of --model_family come from it."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import trainer.models
from trainer.config import TrainConfig, parse_args
from trainer.errors import ConfigError, TrainerError

ROOT = Path(__file__).resolve().parents[1]
MODELS = ROOT / "trainer" / "models"

# a whole family package, as a helper adding one would write it (no other file edited)
FAKE_FAMILY = '''
import torch

from trainer.models.base import FamilyEncoding, ModelFamily, register_family
from trainer.objectives import FlowMatchObjective


def encode_text(pipe, captions, device):
    return {"prompt_embeds": torch.zeros(len(captions), 4, 8)}


@register_family
class Fake(ModelFamily):
    name = "fakefam"
    denoiser_class = torch.nn.Linear
    subfolder = "transformer"
    kohya_prefix = "lora_transformer_"
    default_targets = ("to_q",)
    conditioning = {"prompt_embeds": 2}
    encoding = FamilyEncoding(1024, lambda config: 2, encode_text, latent_scale=(0.5, 0.1))

    def matches(self, config):
        return config.get("_class_name") == "FakeTransformer"

    def make_objective(self, loaded, options):
        return FlowMatchObjective({"shift": 1.0}, options)

    def forward(self, model, noisy, timesteps, batch):
        return model(noisy)
'''


def run_python(code: str) -> dict:
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, cwd=ROOT,
                          env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_every_package_is_a_family_under_its_own_name():
    names = trainer.models.family_names()
    # the built-in families, in name order; new family packages add themselves without editing this test
    assert {"flux", "sd", "sd3", "sdxl"} <= set(names) and names == tuple(sorted(names))
    assert tuple(trainer.models.FAMILIES) == names
    for name, family in trainer.models.FAMILIES.items():
        assert family.name == name
        assert type(family).__module__ == f"trainer.models.{name}"
        assert family.encoding.resolution in (480, 512, 544, 1024)


def test_model_family_choices_come_from_the_registry():
    choices = next(f.metadata["choices"] for f in TrainConfig.parameters()
                   if f.name == "model_family")
    assert choices == ("auto", *trainer.models.family_names())
    with pytest.raises(ConfigError, match="model_family"):
        parse_args(["--model", "demo", "--model_family", "nosuchfamily"])


def test_a_new_package_is_picked_up_without_editing_other_files(tmp_path):
    # the package lives outside the repository: only trainer.models' search path knows it, as it
    # would know a new folder trainer/models/fakefam/
    (tmp_path / "fakefam").mkdir()
    (tmp_path / "fakefam" / "__init__.py").write_text(FAKE_FAMILY)
    found = run_python(f"""
        import json, sys
        import trainer.models
        trainer.models.__path__.append({str(tmp_path)!r})
        from trainer.config import parse_args
        listed = trainer.models.family_names()
        light = "torch" not in sys.modules  # listing and --model_family parsing import no family
        cfg = parse_args(["--model", "demo", "--model_family", "fakefam"])
        from trainer.models.base import detect_family, get_family
        from trainer.comfy_inputs import latents_dataset
        import torch
        ds = latents_dataset({{"samples": torch.ones(1, 4, 2, 2)}}, "fakefam")
        print(json.dumps({{"listed": listed, "light": light, "parsed": cfg.model_family,
                           "got": get_family("fakefam").name,
                           "detected": detect_family({{"_class_name": "FakeTransformer"}}, "x").name,
                           "latent": float(ds[0]["latents"].flat[0])}}))
        """)
    assert "fakefam" in found["listed"] and found["light"]
    assert found["parsed"] == found["got"] == found["detected"] == "fakefam"
    assert found["latent"] == pytest.approx((1 - 0.1) * 0.5)  # the family's own LATENT scale and shift


def test_a_package_registering_no_family_is_one_clear_error(tmp_path, monkeypatch):
    (tmp_path / "emptyfam").mkdir()
    (tmp_path / "emptyfam" / "__init__.py").write_text('"""forgot @register_family"""\n')
    monkeypatch.setattr(trainer.models, "__path__", [*trainer.models.__path__, str(tmp_path)])
    monkeypatch.delitem(sys.modules, "trainer.models.emptyfam", raising=False)
    with pytest.raises(TrainerError, match="emptyfam.*registers no model family"):
        trainer.models.families()


def test_a_family_missing_part_of_the_interface_is_refused_by_name():
    from trainer.models.base import ModelFamily, register_family

    class Half(ModelFamily):
        name = "half"

        def matches(self, config):
            return False

    with pytest.raises(TrainerError, match="does not define denoiser_class, .*encoding, forward, make_objective"):
        register_family(Half)
    assert "half" not in trainer.models.FAMILIES


def imported_modules(path: Path, package: str) -> set[str]:
    """Absolute names of the trainer modules a file imports (relative imports resolved)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            base = package.split(".")[:len(package.split(".")) - node.level + 1] if node.level else []
            module = ".".join([*base, node.module] if node.module else base)
            names.add(module)
            names.update(f"{module}.{alias.name}" for alias in node.names)
        elif isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
    return names


@pytest.mark.parametrize("family", trainer.models.family_names())
def test_no_family_imports_another(family):
    others = {f"trainer.models.{name}" for name in trainer.models.family_names() if name != family}
    for path in (MODELS / family).rglob("*.py"):
        package = ".".join(("trainer", *path.parent.relative_to(ROOT / "trainer").parts))  # its __package__
        bad = {m for m in imported_modules(path, package) if any(m == o or m.startswith(o + ".") for o in others)}
        assert not bad, f"{path.relative_to(ROOT)} imports {sorted(bad)}"
