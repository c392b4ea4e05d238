"""Video memory: host memory and step time of training real-width Wan 2.1 and HunyuanVideo blocks over a
grid of frame counts and resolutions, with gradient checkpointing on (the default) and off (issue 18).

    python bench/memory_video.py                 # the recorded grid, ~30 min on 2 cores (--max_minutes 30)
    python bench/memory_video.py --quick         # narrow models, tiny clips: a smoke run (~2 min)
    python bench/memory_video.py --families wan_1.3b --no_record

Each model keeps its real per-layer shapes (width, heads, feed-forward, text width, patch) with only 1 or 2
blocks, is saved as a bf16 diffusers folder and trained for --steps bf16 steps (batch 1, LoRA rank 16 on
every Linear, the trainer's defaults otherwise) in a fresh process, measured as bench/memory_real.py
measures (its sampler: peak anonymous resident memory above the process's baseline after the imports;
the bf16 folder's weights stay memory-mapped, so the figure is activations, adapter and optimizer state).
The difference between the 1-block and 2-block runs of a point is what one more block costs, so a full
model's peak is about the 1-block figure plus (blocks - 1) times that, plus its weights if they are not
memory-mapped. Pixel frames F give latent frames T = (F - 1) / 4 + 1 and pixel sides latent sides / 8,
as the Wan 2.1 and HunyuanVideo VAEs do; tokens are T x H/2 x W/2 (patch 1x2x2).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from memory_real import ROOT, measure, random_bf16, record, table

#: real per-layer shapes; ``blocks`` names the config fields counted as blocks (1 each in the base run)
MODELS = {
    # Wan 2.1 T2V 14B: 5120 wide, 40 heads of 128, feed-forward 13824, UMT5 text 4096, 40 blocks
    "wan_14b": dict(cls="WanTransformer3DModel", blocks=("num_layers",), text=("wan", 512),
                    config=dict(patch_size=(1, 2, 2), num_attention_heads=40, attention_head_dim=128, in_channels=16,
                                out_channels=16, text_dim=4096, freq_dim=256, ffn_dim=13824, num_layers=1,
                                cross_attn_norm=True, qk_norm="rms_norm_across_heads", eps=1e-6)),
    # Wan 2.1 T2V 1.3B: 1536 wide, 12 heads of 128, feed-forward 8960, 30 blocks
    "wan_1.3b": dict(cls="WanTransformer3DModel", blocks=("num_layers",), text=("wan", 512),
                     config=dict(patch_size=(1, 2, 2), num_attention_heads=12, attention_head_dim=128, in_channels=16,
                                 out_channels=16, text_dim=4096, freq_dim=256, ffn_dim=8960, num_layers=1,
                                 cross_attn_norm=True, qk_norm="rms_norm_across_heads", eps=1e-6)),
    # HunyuanVideo: 3072 wide, 24 heads of 128, Llama text 4096 + CLIP-L pooled 768, 20 double + 40 single
    "hunyuan_video": dict(cls="HunyuanVideoTransformer3DModel", blocks=("num_layers", "num_single_layers"),
                          text=("hunyuan", 256),
                          config=dict(in_channels=16, out_channels=16, num_attention_heads=24, attention_head_dim=128,
                                      num_layers=1, num_single_layers=1, num_refiner_layers=2, mlp_ratio=4.0,
                                      patch_size=2, patch_size_t=1, qk_norm="rms_norm", guidance_embeds=True,
                                      text_embed_dim=4096, pooled_projection_dim=768, rope_axes_dim=(16, 56, 56))),
}
#: what the quick run narrows (the same code paths, a fraction of the arithmetic)
QUICK = {"wan_14b": dict(num_attention_heads=2, ffn_dim=512, text_dim=256),
         "wan_1.3b": dict(num_attention_heads=2, ffn_dim=384, text_dim=256),
         "hunyuan_video": dict(num_attention_heads=2, text_embed_dim=256, pooled_projection_dim=64,
                               num_refiner_layers=1)}
#: what one more of ``blocks`` adds, per family kind
BLOCK_NAMES = {("WanTransformer3DModel", "num_layers"): "block",
               ("HunyuanVideoTransformer3DModel", "num_layers"): "double block",
               ("HunyuanVideoTransformer3DModel", "num_single_layers"): "single block"}

#: (model, pixel frames, pixel height, pixel width, gradient checkpointing), the costliest points last: on the
#: shared 2-core machine the first nine took 32 min and --max_minutes 30 dropped the Wan 14B 480x832 ones
#: (6 min on their own: --families wan_14b --resolutions 480x832)
GRID = [("wan_14b", 1, 256, 256, True), ("wan_14b", 17, 256, 256, True), ("wan_14b", 33, 256, 256, True),
        ("wan_14b", 17, 256, 256, False),
        ("wan_1.3b", 17, 480, 832, True), ("wan_1.3b", 17, 480, 832, False), ("wan_1.3b", 33, 480, 832, True),
        ("hunyuan_video", 17, 256, 256, True), ("hunyuan_video", 17, 480, 832, True),
        ("wan_14b", 1, 480, 832, True), ("wan_14b", 17, 480, 832, True)]
QUICK_GRID = [("wan_14b", 1, 64, 64, True), ("wan_14b", 5, 64, 64, True), ("wan_14b", 5, 64, 64, False),
              ("hunyuan_video", 5, 64, 64, True)]

GIB = 2 ** 30


def model_config(name: str, quick: bool, extra_blocks: str | None) -> dict:
    config = dict(MODELS[name]["config"], **(QUICK[name] if quick else {}))
    if extra_blocks is not None:
        config[extra_blocks] += 1
    return config


def latent_shape(frames: int, height: int, width: int) -> tuple[int, int, int]:
    """Latent (T, H, W) of a clip of ``frames`` pixel frames at height x width (the 4x temporal, 8x spatial VAEs)."""
    if (frames - 1) % 4 or height % 16 or width % 16:
        raise SystemExit(f"{frames} frames of {height}x{width}: frames must be 4k+1 and sides multiples of 16")
    return (frames - 1) // 4 + 1, height // 8, width // 8


def video_dataset(folder: Path, name: str, config: dict, shape: tuple[int, int, int], rows: int = 1) -> None:
    """``rows`` random rows of latents [16, T, H, W] and the family's conditioning columns, saved to disk."""
    from datasets import Array2D, Array4D, Dataset, Features, Sequence, Value

    kind, tokens = MODELS[name]["text"]
    g = torch.Generator().manual_seed(0)
    latent = (config["in_channels"], *shape)
    columns = {"latents": torch.randn(rows, *latent, generator=g)}
    features = {"latents": Array4D(latent, "float32")}
    if kind == "wan":
        text_dim = config["text_dim"]
    else:
        text_dim = config["text_embed_dim"]
        columns["prompt_attention_mask"] = torch.ones(rows, tokens)
        columns["pooled_prompt_embeds"] = torch.randn(rows, config["pooled_projection_dim"], generator=g)
        features["prompt_attention_mask"] = Sequence(Value("float32"), length=tokens)
        features["pooled_prompt_embeds"] = Sequence(Value("float32"), length=config["pooled_projection_dim"])
    columns["prompt_embeds"] = torch.randn(rows, tokens, text_dim, generator=g)
    features["prompt_embeds"] = Array2D((tokens, text_dim), "float32")
    Dataset.from_dict({k: list(v.numpy()) for k, v in columns.items()},
                      features=Features(features)).save_to_disk(str(folder))


def blocks_label(name: str, config: dict) -> str:
    keys = MODELS[name]["blocks"]
    if len(keys) == 1:
        return str(config[keys[0]])
    return f"{config['num_layers']} double + {config['num_single_layers']} single"


def run_point(args, folder: Path, models: dict, point: tuple) -> list[list]:
    """The rows of one grid point: the 1-block run, then one run per block kind with one more of it."""
    import diffusers

    diffusers.logging.set_verbosity_error()  # the bf16 cast of fp32-kept modules: saved in bf16 on purpose
    name, frames, height, width, checkpointing = point
    shape = latent_shape(frames, height, width)
    tokens = shape[0] * (shape[1] // 2) * (shape[2] // 2)
    data = folder / f"data_{name}_{frames}_{height}x{width}"
    if not data.exists():
        video_dataset(data, name, model_config(name, args.quick, None), shape)
    rows, base = [], None
    for extra in (None, *MODELS[name]["blocks"]):
        config = model_config(name, args.quick, extra)
        key = (name, extra)
        if key not in models:  # each model is built and saved once, for every point that trains it
            model = random_bf16(getattr(diffusers, MODELS[name]["cls"]), config)
            models[key] = (folder / f"model_{name}_{extra}", sum(p.numel() * 2 for p in model.parameters()))
            model.save_pretrained(models[key][0], safe_serialization=True)
            del model
        path, weight_bytes = models[key]
        out = folder / "out"
        params = dict(steps=args.steps, training_dtype="bf16", lora_dtype="bf16", batch_size=1, rank=16,
                      gradient_checkpointing=checkpointing, log_every=1)
        started = time.perf_counter()
        r = measure(Path(args.code), str(path), str(data), out, params, threads=args.threads)
        wall = time.perf_counter() - started
        result = json.loads((out / "result.json").read_text())
        above = (r["peak_anon"] - r["baseline_anon"]) / GIB
        per_block = ""
        if base is None:
            base = above
        else:
            per_block = f"{above - base:.2f} per {BLOCK_NAMES[MODELS[name]['cls'], extra]}"
        rows.append([name, config["num_attention_heads"] * config["attention_head_dim"], blocks_label(name, config),
                     f"{frames} -> {shape[0]}", f"{height}x{width} -> {shape[1]}x{shape[2]}", tokens,
                     "on" if checkpointing else "off", f"{weight_bytes / GIB:.2f}", f"{above:.2f}", per_block,
                     f"{args.steps / result['samples_per_second']:.1f}"])
        print(rows[-1], f"(run {wall:.0f} s)", flush=True)
    return rows


HEADER = ["family", "width", "blocks", "frames (pixels -> latent T)", "resolution (pixels -> latent HxW)", "tokens",
          "checkpointing", "bf16 weights GiB", "peak anon GiB above baseline",
          "activations GiB per block (2 - 1 blocks)", "s/step"]


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--families", nargs="*", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--resolutions", nargs="*", default=None,
                        help="only the grid points at these pixel sizes (HxW, e.g. 480x832)")
    parser.add_argument("--steps", type=int, default=1, help="bf16 training steps per run")
    parser.add_argument("--threads", type=int, default=2, help="OMP threads of the measured runs")
    parser.add_argument("--code", default=str(ROOT), help="checkout whose trainer is measured")
    parser.add_argument("--max_minutes", type=float, default=30,
                        help="start no further grid point after this many minutes (the rest are listed as dropped)")
    parser.add_argument("--quick", action="store_true", help="narrow models, tiny clips: a smoke run")
    parser.add_argument("--no_record", action="store_true", help="do not append to bench/RESULTS.md")
    args = parser.parse_args(argv)
    sys.path.insert(0, str(ROOT))
    grid = [p for p in (QUICK_GRID if args.quick else GRID) if p[0] in args.families
            and (args.resolutions is None or f"{p[2]}x{p[3]}" in args.resolutions)]
    started = time.perf_counter()
    rows, dropped = [], []
    with tempfile.TemporaryDirectory() as tmp:
        models = {}
        for point in grid:
            if time.perf_counter() - started > args.max_minutes * 60:
                dropped.append(point)
                continue
            rows += run_point(args, Path(tmp), models, point)
    minutes = (time.perf_counter() - started) / 60
    title = (f"Video memory: real-width Wan 2.1 and HunyuanVideo blocks, {args.steps} bf16 step(s), batch 1, "
             f"LoRA rank 16 on every Linear, {args.threads} threads; {minutes:.0f} min in all"
             + (" (quick: narrowed models)" if args.quick else ""))
    text = table(title, HEADER, rows)
    if dropped:
        text += ("\nDropped past --max_minutes: " + "; ".join(
            f"{name} {frames} frames {h}x{w} checkpointing {'on' if on else 'off'}"
            for name, frames, h, w, on in dropped) + "\n")
    print(text)
    if not args.no_record:
        record("bench/memory_video.py", argv, text)


if __name__ == "__main__":
    main()
