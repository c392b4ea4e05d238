"""Benchmarks: trainer overhead against a bare PyTorch loop, data-pipeline headroom, peak memory.

    python bench/run.py                      # the defaults: a few minutes on a 2-core CPU
    python bench/run.py --quick              # a smoke run (seconds), used by the tests
    python bench/run.py --device cuda        # on a GPU: also samples/s and model FLOP utilisation

Prints a table per section and appends rows to bench/RESULTS.md (machine, date, command). These
are measurements, not tests: nothing here asserts a speed.
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
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import overhead

RESULTS = ROOT / "bench" / "RESULTS.md"
TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]


def unet_config(width: int, resolution: int, cross_dim: int) -> dict:
    """An SD-style UNet (3 resolutions, cross-attention in the first two) scaled by ``width``."""
    return dict(sample_size=resolution, in_channels=4, out_channels=4, layers_per_block=1,
                block_out_channels=(width, 2 * width, 4 * width),
                down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
                cross_attention_dim=cross_dim, attention_head_dim=8, norm_num_groups=32)


def make_fixture(folder: Path, args) -> tuple[Path, Path]:
    """Save the benchmark UNet and a latents dataset to disk, as a user would have them."""
    from datasets import Array2D, Array3D, Dataset, Features
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    unet = UNet2DConditionModel(**unet_config(args.width, args.resolution, args.cross_dim))
    unet.save_pretrained(folder / "unet")
    rows = max(args.rows, args.batch_size)
    g = torch.Generator().manual_seed(0)
    latents = torch.randn(rows, 4, args.resolution, args.resolution, generator=g)
    embeds = torch.randn(rows, args.tokens, args.cross_dim, generator=g)
    features = Features({"latents": Array3D((4, args.resolution, args.resolution), "float32"),
                         "prompt_embeds": Array2D((args.tokens, args.cross_dim), "float32")})
    Dataset.from_dict({"latents": list(latents.numpy()), "prompt_embeds": list(embeds.numpy())},
                      features=features).save_to_disk(str(folder / "latents"))
    return folder / "unet", folder / "latents"


# ----------------------------------------------------------------------------- overhead


def bare_loop_step_time(unet_dir: Path, data_dir: Path, args) -> float:
    """Seconds per optimizer step of a plain PyTorch loop doing the trainer's work: same model, adapted
    modules, rank, batch, optimizer, dtype and objective (epsilon, MSE), data already in memory."""
    from datasets import load_from_disk
    from diffusers import DDPMScheduler, UNet2DConditionModel
    from peft import LoraConfig

    device = torch.device(args.device)
    unet = UNet2DConditionModel.from_pretrained(unet_dir).to(device)
    unet.requires_grad_(False)
    unet.add_adapter(LoraConfig(r=args.rank, lora_alpha=args.rank, target_modules=TARGETS))
    params = [p for p in unet.parameters() if p.requires_grad]
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    for p in unet.parameters():
        if not p.requires_grad:
            p.data = p.data.to(dtype)
    if args.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    unet.train()
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    scheduler = DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    ds = load_from_disk(str(data_dir)).with_format("torch")
    latents = ds["latents"][: args.batch_size].to(device)
    embeds = ds["prompt_embeds"][: args.batch_size].to(device)

    def step():
        noise = torch.randn_like(latents)
        t = torch.randint(0, 1000, (latents.shape[0],), device=device)
        noisy = scheduler.add_noise(latents, noise, t)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.dtype == "bf16"):
            pred = unet(noisy, t, encoder_hidden_states=embeds, return_dict=False)[0]
        loss = torch.nn.functional.mse_loss(pred.float(), noise)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    for _ in range(args.warmup):
        step()
    _sync(device)
    start = time.perf_counter()
    for _ in range(args.steps):
        step()
    _sync(device)
    return (time.perf_counter() - start) / args.steps


# ----------------------------------------------------------------------------- data


def data_throughput(data_dir: Path, args, rows: int | None = None) -> float:
    """Samples/s the real latent pipeline delivers alone: random access, collate, noise draws."""
    from diffusers import UNet2DConditionModel

    from trainer.data import StepBatchSampler, TrainingData, build_dataloader
    from trainer.models import get_family

    model = UNet2DConditionModel.from_config(unet_config(8, args.resolution, args.cross_dim) |
                                             {"block_out_channels": (32, 32, 32)})
    data = TrainingData(str(data_dir), None, get_family("sd"), model)
    batches = max(20, (rows or data.num_rows) // args.batch_size // 4)
    sampler = StepBatchSampler(data.num_rows, args.batch_size, 1, 1, seed=0, start_step=0, end_step=batches)
    loader = build_dataloader(data, sampler, seed=0, num_workers=0)
    start = time.perf_counter()
    n = 0
    for batch in loader:
        n += batch["latents"].shape[0]
    return n / (time.perf_counter() - start)


def data_scaling(args, folder: Path) -> list[tuple[int, float]]:
    """Delivered samples/s against dataset size (memory-mapped Arrow: the per-batch cost must not grow)."""
    from datasets import Array2D, Array3D, Dataset, Features

    out = []
    for rows in args.scaling_rows:
        path = folder / f"scale{rows}"
        features = Features({"latents": Array3D((4, args.resolution, args.resolution), "float16"),
                             "prompt_embeds": Array2D((args.tokens, args.cross_dim), "float16")})

        def gen(n=rows):
            g = torch.Generator().manual_seed(n)
            for _ in range(n):
                yield {"latents": torch.randn(4, args.resolution, args.resolution, generator=g).half().numpy(),
                       "prompt_embeds": torch.randn(args.tokens, args.cross_dim, generator=g).half().numpy()}

        Dataset.from_generator(gen, features=features).save_to_disk(str(path))
        out.append((rows, data_throughput(path, args, rows)))
    return out


# ----------------------------------------------------------------------------- memory


def peak_memory(unet_dir: Path, data_dir: Path, out: Path, args, **overrides) -> tuple[float, float]:
    """(peak MiB, s/step) of a short training run in its own process.

    CPU: the resident-set high-water mark from the start of ``train_lora`` (Linux lets a process
    reset it through /proc/self/clear_refs, so import-time memory does not hide the run's); GPU:
    ``max_memory_allocated``. s/step is the training loop's own (from result.json), start-up excluded.
    """
    params = dict(model=str(unet_dir), latents=str(data_dir), steps=3, batch_size=args.memory_batch_size,
                  rank=args.rank, alpha=args.rank, training_dtype=args.dtype, lora_dtype=args.dtype,
                  gradient_checkpointing=args.gradient_checkpointing, output_dir=str(out / "mem"), log_every=3)
    params.update(overrides)
    code = (
        "import json, resource, torch\n"
        "from trainer import train_lora\n"
        "def hwm():\n"
        "    for line in open('/proc/self/status'):\n"
        "        if line.startswith('VmHWM:'):\n"
        "            return int(line.split()[1]) / 1024\n"
        "try:\n"
        "    open('/proc/self/clear_refs', 'w').write('5')\n"
        "except OSError:\n"
        "    pass\n"
        f"params = json.loads({json.dumps(json.dumps(params))})\n"
        "train_lora(**params)\n"
        "peak = torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_available() else hwm()\n"
        "result = json.load(open(params['output_dir'] + '/result.json'))\n"
        "print(json.dumps({'peak': peak, 'step': params['batch_size'] / result['samples_per_second']}))\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True, cwd=ROOT,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"})
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    return result["peak"], result["step"]


# ----------------------------------------------------------------------------- GPU


def flop_utilisation(step_seconds: float, unet_dir: Path, args) -> float | None:
    """Model FLOP utilisation: 3 x forward FLOPs (forward + backward) per step over the GPU's bf16 peak.

    Forward FLOPs are counted with torch's FlopCounterMode on one forward pass."""
    if args.device != "cuda" or not args.peak_tflops:
        return None
    from diffusers import UNet2DConditionModel
    from torch.utils.flop_counter import FlopCounterMode

    unet = UNet2DConditionModel.from_pretrained(unet_dir).to("cuda", torch.bfloat16)
    x = torch.randn(args.batch_size, 4, args.resolution, args.resolution, device="cuda", dtype=torch.bfloat16)
    c = torch.randn(args.batch_size, args.tokens, args.cross_dim, device="cuda", dtype=torch.bfloat16)
    t = torch.full((args.batch_size,), 500, device="cuda")
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        unet(x, t, c)
    return 3 * counter.get_total_flops() / step_seconds / (args.peak_tflops * 1e12)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


# ----------------------------------------------------------------------------- report


def machine() -> str:
    if torch.cuda.is_available():
        return torch.cuda.get_device_name(0)
    return f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPU cores"


def table(title: str, header: list[str], rows: list[list]) -> str:
    lines = [f"**{title}**", "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--width", type=int, default=64, help="UNet base channels (x1, x2, x4)")
    parser.add_argument("--resolution", type=int, default=32, help="latent side (pixels / 8)")
    parser.add_argument("--cross_dim", type=int, default=256)
    parser.add_argument("--tokens", type=int, default=77)
    parser.add_argument("--batch_size", type=int, default=2)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32")
    parser.add_argument("--gradient_checkpointing", action="store_true")
    parser.add_argument("--steps", type=int, default=10, help="timed steps (after warm-up)")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=3, help="interleaved bare/trainer pairs per overhead shape")
    parser.add_argument("--overhead_shapes", type=lambda s: tuple(map(int, s.split("x"))), nargs="*", default=None,
                        metavar="WIDTHxBATCH", help="overhead shapes (default: width and 2 x width, each with "
                        "batch and 4 x batch)")
    parser.add_argument("--memory_batch_size", type=int, default=8, help="batch of the memory runs")
    parser.add_argument("--rows", type=int, default=64)
    parser.add_argument("--scaling_rows", type=int, nargs="*", default=[256, 4096])
    parser.add_argument("--ranks", type=int, nargs="*", default=[1, 8, 32, 128])
    parser.add_argument("--resolutions", type=int, nargs="*", default=[16, 32, 48])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--peak_tflops", type=float, default=None, help="GPU bf16 dense peak, for MFU")
    parser.add_argument("--quick", action="store_true", help="tiny sizes, few steps: a smoke run")
    parser.add_argument("--no_record", action="store_true", help="do not append to bench/RESULTS.md")
    parser.add_argument("--overhead_only", action="store_true", help="run only the overhead section")
    startup = parser.add_argument_group("start-up against dataset size (bench/startup.py)")
    startup.add_argument("--startup", action="store_true", help="run only this section")
    startup.add_argument("--startup_rows", type=int, nargs="*", default=[1000, 100_000, 1_000_000])
    startup.add_argument("--startup_kinds", nargs="*", default=["save_to_disk", "parquet", "bucketed",
                                                                "bucketed+shape"])
    startup.add_argument("--startup_steps", type=int, default=30, help="steps of the per-step runs (0: skip)")
    startup.add_argument("--startup_dir", default=None, help="where the datasets are built (default: $TMPDIR)")
    startup.add_argument("--before", default=None, help="another checkout to measure the same way")
    startup.add_argument("--before_max_rows", type=int, default=100_000, help="largest size run with --before")
    args = parser.parse_args(argv)
    if args.startup:
        import startup as startup_bench

        record(startup_bench.run(args), args, argv, "start-up")
        return
    if args.quick:
        args.width, args.resolution, args.cross_dim, args.tokens = 32, 8, 32, 8
        args.steps, args.warmup, args.rows, args.memory_batch_size = 2, 1, 8, 2
        args.scaling_rows, args.ranks, args.resolutions = [16, 64], [4], []
        args.repeats, args.overhead_shapes = 1, [(args.width, args.batch_size)]
    if args.overhead_shapes is None:
        args.overhead_shapes = [(w, b) for w in (args.width, 2 * args.width)
                                for b in (args.batch_size, 4 * args.batch_size)]
    args.targets = TARGETS

    if args.overhead_only:
        with tempfile.TemporaryDirectory() as tmp:
            text, _ = overhead.section(args, Path(tmp), make_fixture, table)
        record(text, args, argv, f"latents {args.resolution}x{args.resolution}, rank {args.rank}, {args.dtype}")
        return

    sections = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        unet_dir, data_dir = make_fixture(tmp, args)

        text, ours = overhead.section(args, tmp, make_fixture, table)
        sections.append(text)
        consumed = args.batch_size / ours
        mfu = flop_utilisation(ours, unet_dir, args)
        if mfu is not None:
            sections.append(f"Model FLOP utilisation (width {args.width}, batch {args.batch_size}): {mfu:.1%}\n")

        delivered = data_throughput(data_dir, args)
        scaling = data_scaling(args, tmp)
        rows = [[f"{args.rows} (fp32)", f"{delivered:.0f}", f"{delivered / consumed:.0f}x"]]
        rows += [[f"{n} (fp16)", f"{s:.0f}", f"{s / consumed:.0f}x"] for n, s in scaling]
        sections.append(table("Data: samples/s delivered by the latent pipeline alone vs consumed by training",
                              ["dataset rows", "delivered samples/s", "headroom"], rows))

        base = dict(gradient_checkpointing=False, training_dtype="fp32", lora_dtype="fp32")
        variants = [("fp32 weights, fp32 adapter, no checkpointing", {}),
                    ("+ gradient checkpointing", {"gradient_checkpointing": True}),
                    ("bf16 frozen weights", {"training_dtype": "bf16"}),
                    ("bf16 adapter file", {"lora_dtype": "bf16"})]
        rows = []
        for name, change in variants[:2] if args.quick else variants:
            peak, step = peak_memory(unet_dir, data_dir, tmp, args, **{**base, **change})
            rows.append([name, f"{peak:.0f}", f"{step:.3f}"])
        for rank in args.ranks:
            peak, step = peak_memory(unet_dir, data_dir, tmp, args, **{**base, "rank": rank, "alpha": rank})
            rows.append([f"rank {rank}", f"{peak:.0f}", f"{step:.3f}"])
        for res in args.resolutions:
            folder = tmp / f"res{res}"
            folder.mkdir()
            sub = argparse.Namespace(**{**vars(args), "resolution": res})
            res_unet, res_data = make_fixture(folder, sub)
            peak, step = peak_memory(res_unet, res_data, tmp, sub, **base)
            rows.append([f"latents {res}x{res}", f"{peak:.0f}", f"{step:.3f}"])
        unit = "peak MiB (CUDA allocated)" if args.device == "cuda" else "peak MiB (RSS during the run)"
        sections.append(table(f"Memory and step time (batch {args.memory_batch_size}, 3-step runs)",
                              ["configuration", unit, "s/step"], rows))

    record("\n".join(sections), args, argv, f"UNet width {args.width}, latents {args.resolution}x{args.resolution}, "
           f"batch {args.batch_size}, rank {args.rank}, {args.dtype}")


def record(body: str, args, argv, what: str) -> None:
    """Print a section and append it to bench/RESULTS.md (unless --no_record)."""
    command = "python bench/run.py " + " ".join(argv if argv is not None else sys.argv[1:])
    header = (f"### {datetime.date.today()}: {machine()}\n\n`{command.strip()}` ({what}, "
              f"torch {torch.__version__})\n")
    report = header + "\n" + body
    print(report)
    if not args.no_record:
        with RESULTS.open("a") as f:
            f.write("\n" + report)


if __name__ == "__main__":
    main()
