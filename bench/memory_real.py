"""Real sizes: host memory of loading and training a real-width model, per --weight_dtype, and how far a
low-precision base moves the trained adapter (SPEC section 8, issue 14).

    python bench/memory_real.py                   # Flux-width transformer (0.69 B parameters), ~10 min on 2 cores
    python bench/memory_real.py --quick           # narrower model, fewer steps: a smoke run
    python bench/memory_real.py --code /work/main # measure another checkout (before/after)

Memory: a Flux-width transformer (3072 wide, 24 heads of 128, 1 double + 2 single blocks) is built here
and saved as a bf16 diffusers folder (and as a BFL single file stored in fp8), then trained for 2 bf16 steps
in a fresh process. The figure is the process's peak anonymous resident memory (RssAnon, sampled every
2 ms; reclaimable pages of memory-mapped files are not counted) above its baseline after the imports,
divided by the model's bf16 bytes. VmHWM (resident, file pages included) is reported alongside.

Distance: the demo UNet and data, a few dozen steps per --weight_dtype from the same seed; the relative
L2 distance of the trained LoRA tensors and the largest per-step loss difference from the bf16 base.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "RESULTS.md"

#: FLUX.1's width with few blocks: the per-layer shapes of the real model
FLUX_WIDTH = dict(patch_size=1, in_channels=64, num_layers=1, num_single_layers=2, attention_head_dim=128,
                  num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768,
                  guidance_embeds=True, axes_dims_rope=(16, 56, 56))

# the measured process: imports first (the baseline), then one training run; prints one JSON line
CHILD = r"""
import json, sys, threading, time
import torch, diffusers, peft, accelerate, datasets
import trainer.api, trainer.loop
from trainer.api import train_lora

def status(field):
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(field)

def rollup():
    values = {}
    for line in open("/proc/self/smaps_rollup"):
        parts = line.split()
        if len(parts) == 3 and parts[2] == "kB":
            values[parts[0].rstrip(":")] = int(parts[1]) * 1024
    return values

args = json.loads(sys.argv[1])
baseline_anon = status("RssAnon")
open("/proc/self/clear_refs", "w").write("5")  # reset VmHWM to the current RSS
peak = [baseline_anon]
done = threading.Event()

def sample():
    while not done.is_set():
        peak[0] = max(peak[0], status("RssAnon"))
        time.sleep(0.002)

sampler = threading.Thread(target=sample, daemon=True)
sampler.start()
res = train_lora(args["model"], args["latents"], **args["params"])
done.set(); sampler.join()
peak[0] = max(peak[0], status("RssAnon"))
frozen = None
try:
    from trainer.models.precision import frozen_bytes
    frozen = frozen_bytes(res.model_with_lora)
except ImportError:  # a checkout from before --weight_dtype
    frozen = sum(p.numel() * p.element_size() for p in res.model_with_lora.parameters() if not p.requires_grad)
print("RESULT " + json.dumps({"baseline_anon": baseline_anon, "peak_anon": peak[0], "vm_hwm": status("VmHWM"),
                              "end_rollup": rollup(), "frozen_bytes": frozen, "losses": res.loss["loss"]}))
"""


def random_bf16(model_class, config: dict) -> torch.nn.Module:
    """``model_class(**config)`` in bf16 with N(0, 0.02) weights (norms 1, biases 0), built without ever
    holding it in fp32."""
    with torch.device("meta"):
        model = model_class(**config)
    model = model.to(dtype=torch.bfloat16).to_empty(device="cpu")
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 1:
                p.fill_(1.0 if "norm" in name else 0.0)
            else:
                p.copy_(torch.randn(p.shape, generator=g) * 0.02)
    # buffers (Wan's rotary tables) are left uninitialised: fine for saving, as long as they are not
    # persistent (save_pretrained leaves them out and loading rebuilds them)
    assert all(name not in model.state_dict() for name, _ in model.named_buffers()), model_class
    return model


def build_flux_width(folder: Path, config: dict, fp8_file: Path | None = None) -> int:
    """Save a Flux-width transformer as a bf16 diffusers folder without ever holding it in fp32; return its
    bf16 bytes."""
    from diffusers import FluxTransformer2DModel

    model = random_bf16(FluxTransformer2DModel, config)
    model.save_pretrained(folder, safe_serialization=True)
    if fp8_file is not None:
        # ComfyUI's flux1-dev-fp8 layout: BFL names, stored float8_e4m3fn (the tests' BFL writer)
        from safetensors.torch import save_file

        sys.path.insert(0, str(ROOT / "tests"))
        from test_model_files import bfl_state_dict

        save_file({k: v.to(torch.float8_e4m3fn).contiguous() for k, v in bfl_state_dict(model).items()},
                  str(fp8_file))
    size = sum(p.numel() * 2 for p in model.parameters())
    del model
    return size


def flux_dataset(folder: Path, config: dict, rows: int, side: int, tokens: int) -> None:
    from datasets import Array2D, Array3D, Dataset, Features, Sequence, Value

    channels = config["in_channels"] // 4
    g = torch.Generator().manual_seed(0)
    columns = {"latents": torch.randn(rows, channels, side, side, generator=g),
               "prompt_embeds": torch.randn(rows, tokens, config["joint_attention_dim"], generator=g),
               "pooled_prompt_embeds": torch.randn(rows, config["pooled_projection_dim"], generator=g)}
    features = Features({"latents": Array3D((channels, side, side), "float32"),
                         "prompt_embeds": Array2D((tokens, config["joint_attention_dim"]), "float32"),
                         "pooled_prompt_embeds": Sequence(Value("float32"), length=config["pooled_projection_dim"])})
    Dataset.from_dict({k: list(v.numpy()) for k, v in columns.items()}, features=features).save_to_disk(str(folder))


def measure(code: Path, model: str, latents: str, out: Path, params: dict, threads: int = 1) -> dict:
    """One training run in a fresh process of the checkout ``code``; its memory figures."""
    env = {**os.environ, "PYTHONPATH": str(code), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": str(threads),
           "TOKENIZERS_PARALLELISM": "false"}
    arg = json.dumps({"model": model, "latents": latents, "params": {**params, "output_dir": str(out)}})
    proc = subprocess.run([sys.executable, "-c", CHILD, arg], capture_output=True, text=True, env=env, cwd=code)
    line = next((l for l in proc.stdout.splitlines() if l.startswith("RESULT ")), None)
    if line is None:
        raise SystemExit(f"measured run failed:\n{proc.stderr[-3000:]}")
    return json.loads(line[len("RESULT "):])


def memory_section(args, folder: Path) -> tuple[str, list[list]]:
    config = dict(FLUX_WIDTH, num_layers=args.double_blocks, num_single_layers=args.single_blocks)
    if args.quick:
        config.update(num_attention_heads=8, joint_attention_dim=1024)
    fp8_file = folder / "flux1-fp8.safetensors" if args.fp8_file else None
    bf16_bytes = build_flux_width(folder / "flux", config, fp8_file)
    flux_dataset(folder / "latents", config, rows=2, side=args.side, tokens=args.tokens)
    gib = 2 ** 30
    runs = [("bf16 folder", folder / "flux", w) for w in args.weight_dtypes]
    if fp8_file is not None:
        runs += [("fp8 BFL file", fp8_file, w) for w in ("default", "fp8_e4m3fn") if w in args.weight_dtypes]
    rows = []
    for source, model, weight_dtype in runs:
        params = dict(steps=args.steps, training_dtype="bf16", lora_dtype="bf16", batch_size=1,
                      gradient_checkpointing=True, log_every=1, rank=16)
        if weight_dtype != "default":
            params["weight_dtype"] = weight_dtype
        r = measure(Path(args.code), str(model), str(folder / "latents"), folder / f"out_{weight_dtype}", params)
        above = r["peak_anon"] - r["baseline_anon"]
        rows.append([source, weight_dtype, f"{r['frozen_bytes'] / gib:.2f}", f"{r['frozen_bytes'] / bf16_bytes:.2f}",
                     f"{above / gib:.2f}", f"{above / bf16_bytes:.2f}",
                     f"{(r['vm_hwm'] - r['baseline_anon']) / gib:.2f}"])
        print(rows[-1], flush=True)
    title = (f"Real width: Flux-width transformer ({config['num_attention_heads'] * 128} wide, "
             f"{config['num_layers']} double + {config['num_single_layers']} single blocks, "
             f"{bf16_bytes / 2 / 1e9:.2f} B "
             f"parameters, {bf16_bytes / gib:.2f} GiB in bf16), {args.steps} bf16 steps, latents "
             f"{args.side}x{args.side}, code {args.code}")
    return title, rows


def distance_section(args, folder: Path) -> list[list]:
    """Train the demo UNet (saved as a folder, so every --weight_dtype applies) per weight dtype."""
    from trainer.api import train_lora
    from trainer.demo import build_demo_model

    build_demo_model().save_pretrained(folder / "demo")
    runs = {}
    for weight_dtype in args.weight_dtypes:
        runs[weight_dtype] = train_lora(str(folder / "demo"), "demo", steps=args.distance_steps, seed=0,
                                        training_dtype="bf16", lora_dtype="fp32", weight_dtype=weight_dtype,
                                        learning_rate=1e-3, write_outputs=False)

    def vector(res):
        return torch.cat([t.float().flatten() for _, t in sorted(res.lora.items())])

    reference = runs[args.weight_dtypes[0]]
    rows = []
    for weight_dtype, res in runs.items():
        distance = (vector(res) - vector(reference)).norm() / vector(reference).norm()
        loss_gap = max(abs(a - b) for a, b in zip(res.loss["loss"], reference.loss["loss"]))
        rows.append([weight_dtype, f"{distance:.4f}", f"{loss_gap:.4f}", f"{res.loss['loss'][-1]:.4f}"])
        print(rows[-1], flush=True)
    return rows


def table(title: str, header: list[str], rows: list[list]) -> str:
    lines = [f"**{title}**", "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--weight_dtypes", nargs="*", default=["default", "fp8_e4m3fn", "int8"])
    parser.add_argument("--steps", type=int, default=2, help="training steps of the memory runs")
    parser.add_argument("--double_blocks", type=int, default=1, help="double blocks of the Flux-width model")
    parser.add_argument("--single_blocks", type=int, default=2, help="single blocks of the Flux-width model")
    parser.add_argument("--side", type=int, default=32, help="latent side of the memory runs")
    parser.add_argument("--tokens", type=int, default=32, help="text tokens of the memory runs")
    parser.add_argument("--distance_steps", type=int, default=40, help="steps of the distance runs")
    parser.add_argument("--code", default=str(ROOT), help="checkout whose trainer is measured (memory)")
    parser.add_argument("--sections", nargs="*", default=["memory", "distance"], choices=["memory", "distance"])
    parser.add_argument("--fp8_file", action=argparse.BooleanOptionalAction, default=True,
                        help="also measure the model as a BFL single file stored in fp8 (ComfyUI's fp8 Flux)")
    parser.add_argument("--quick", action="store_true", help="narrower model, fewer steps: a smoke run")
    parser.add_argument("--no_record", action="store_true", help="do not append to bench/RESULTS.md")
    args = parser.parse_args(argv)
    if args.quick:
        args.distance_steps, args.side, args.tokens = 4, 16, 8
    sys.path.insert(0, str(ROOT))
    blocks = []
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        if "memory" in args.sections:
            title, rows = memory_section(args, folder)
            blocks.append(table(title, ["model", "weight_dtype", "frozen GiB", "x bf16", "peak anon GiB above baseline",
                                        "x bf16 bytes", "VmHWM GiB above baseline (file pages too)"], rows))
        if "distance" in args.sections:
            rows = distance_section(args, folder)
            blocks.append(table(f"Distance from the bf16 base: demo UNet and data, {args.distance_steps} steps, "
                                "seed 0, LoRA rank 8, lr 1e-3",
                                ["weight_dtype", "LoRA relative L2 distance", "max per-step loss gap",
                                 "final loss"], rows))
    text = "\n".join(blocks)
    print(text)
    if not args.no_record:
        record("bench/memory_real.py", argv, text)


def record(script: str, argv: list[str] | None, text: str) -> None:
    """Append ``text`` to bench/RESULTS.md under a heading with the date, the machine and the command."""
    command = " ".join([f"python {script}", *(argv if argv is not None else sys.argv[1:])])
    head = (f"\n### {datetime.date.today()}: {platform.machine()}, {os.cpu_count()} CPU cores\n\n"
            f"`{command}` (torch {torch.__version__})\n\n")
    with RESULTS.open("a") as f:
        f.write(head + text)


if __name__ == "__main__":
    main()
