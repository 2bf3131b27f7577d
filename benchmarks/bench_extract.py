"""ADM feature extraction, ours against the reference-style path, side by side in one run.

Both sides turn the same images into the same per-pixel features: for every timestep, the noisy
image q_sample(x0, t, noise) goes through the UNet; the outputs of the chosen decoder blocks are
upsampled bilinearly to the image size, concatenated and L2-normalised per pixel
(`--output dense`, what the reference computes; one image at a time, so at most one image's
(D, S, S) features exist at once) -- or kept at native resolution (`--output native`, what
sparseseg's feature store keeps; the UNet alone is compared).

* ours: `ADMBackbone.extract` -- all images x timesteps in one UNet batch, the UNet stopped after
  the deepest requested block; with the fast path (default on CUDA, `--fast on` elsewhere) bf16
  autocast, channels_last and attention through `F.scaled_dot_product_attention`, and with
  `--compile` also torch.compile.
* reference: float32, guided-diffusion's legacy attention, one timestep at a time through the
  whole UNet (including the blocks after the last one needed and the output head), the decoder
  outputs taken with forward hooks.

The weights are random (speed does not depend on them); the flags are guided-diffusion's
256x256 ImageNet ones (`imagenet_256`) with `--channels` base channels (256 is the real model).
`max_rel_err` is the largest relative L2 difference between the two sides' native maps on the
first batch (bf16 on the fast path: about 1e-2).

Peak memory: CUDA: torch.cuda.max_memory_allocated() minus the memory allocated before (the
weights); CPU: each side runs in a fresh spawned process and the figure is its ru_maxrss increase
(peak resident set; includes allocator slack).

Examples:
    python benchmarks/bench_extract.py --device cpu --size 64 --channels 32 --batch 2 --images 4
    python benchmarks/bench_extract.py --device cuda --size 256 --channels 256 --batch 8 \\
        --images 256 --compile --out benchmarks/results/extract.json
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import platform
import resource
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import torch
import torch.nn.functional as F

from sparseseg.backbones.adm import PRESETS, ADMBackbone, ADMUNet
from sparseseg.backbones.diffusion import NoiseSchedule


def build_model(channels: int, seed: int, device: torch.device) -> tuple[ADMUNet, object]:
    """imagenet_256 flags at `channels` base channels, every parameter random (seeded)."""
    heads = 64 if channels >= 128 else channels // 2
    flags = PRESETS["imagenet_256"].model_copy(update=dict(num_channels=channels, num_head_channels=heads))
    torch.manual_seed(seed)
    model = ADMUNet(flags)
    # Replace the zero initialisation of the residual branches by PyTorch's default one, so every
    # layer does real work (it would anyway; this also makes max_rel_err meaningful).
    for module in model.modules():
        if isinstance(module, (torch.nn.Conv2d, torch.nn.Conv1d, torch.nn.Linear)):
            module.reset_parameters()
    return model.to(device).eval(), flags


def make_images(count: int, size: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(count, 3, size, size, generator=g) * 2 - 1, torch.randn(count, 3, size, size, generator=g)


def densify(maps: list[torch.Tensor], size: int) -> torch.Tensor:
    """(B, sum C, S, S) per-pixel features: upsample, concatenate, L2-normalise, image by image."""
    out = None
    for i in range(maps[0].shape[0]):
        parts = [F.interpolate(m[i : i + 1].float(), size=(size, size), mode="bilinear", align_corners=False)
                 for m in maps]
        out = F.normalize(torch.cat(parts, dim=1), dim=1)  # dropped at the next image
    return out


class Reference:
    """The reference-style extractor: float32, legacy attention, full forward per timestep."""

    def __init__(self, model: ADMUNet, flags, timesteps: list[int], blocks: list[int]) -> None:
        self.model, self.timesteps, self.blocks = model, timesteps, blocks
        self.schedule = NoiseSchedule.named(flags.noise_schedule, flags.diffusion_steps)
        self._found: dict[int, torch.Tensor] = {}
        for b in blocks:
            model.output_blocks[b].register_forward_hook(self._hook(b))

    def _hook(self, b: int):
        def record(_module, _inputs, output):
            self._found[b] = output
        return record

    def extract(self, images: torch.Tensor, noise: torch.Tensor) -> list[torch.Tensor]:
        device = next(self.model.parameters()).device
        images, noise = images.to(device), noise.to(device)
        self.model.set_attention("legacy")
        out = []
        with torch.no_grad():
            for t in self.timesteps:
                x_t = self.schedule.q_sample(images, t, noise)
                self.model(x_t, torch.full((len(images),), t, device=device))
                out += [self._found[b] for b in self.blocks]
        self._found = {}
        return out


def make_side(side: str, args: argparse.Namespace, device: torch.device):
    model, flags = build_model(args.channels, args.seed, device)
    timesteps, blocks = args.timesteps, args.blocks
    if side == "ours":
        fast = {"auto": None, "on": True, "off": False}[args.fast]
        return ADMBackbone(model, flags, timesteps, blocks, args.size, device=device, fast=fast, compile=args.compile)
    return Reference(model, flags, timesteps, blocks)


def run_side(side: str, args: argparse.Namespace, device: torch.device, measure_rss: bool) -> dict:
    """Builds one side, warms it up, then times `args.images` images in batches of `args.batch`."""
    if device.type == "cpu":
        torch.set_num_threads(args.threads)
    extractor = make_side(side, args, device)
    images, noise = make_images(args.images, args.size, args.seed)
    cuda = device.type == "cuda"

    def one_batch(start: int) -> list[torch.Tensor]:
        x, n = images[start : start + args.batch], noise[start : start + args.batch]
        maps = extractor.extract(x.to(device), n.to(device))
        if args.output == "dense":
            densify(maps, args.size)
        return maps

    # Warm-up (and compilation); the first image's maps are kept for the comparison of the sides.
    first = [m[:1].float().cpu() for m in one_batch(0)]
    for _ in range(args.warmup - 1):
        one_batch(0)
    if cuda:
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
    before = _maxrss_bytes() if measure_rss else 0
    t0 = time.perf_counter()
    for start in range(0, args.images, args.batch):
        one_batch(start)
    if cuda:
        torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    peak = torch.cuda.max_memory_allocated() - base if cuda else _maxrss_bytes() - before
    path = "reference: float32, legacy attention, full forward per timestep"
    if side == "ours":
        path = ("ours: " + ("bf16 autocast, channels_last, SDPA attention" if extractor.fast
                           else "float32, legacy attention")
                + (", torch.compile" if extractor.compiled else "") + ", timesteps batched, early stop")
    return {"seconds": seconds, "images_per_s": args.images / seconds, "peak_extra_bytes": peak,
            "path": path, "first_maps": first}


def _maxrss_bytes() -> int:
    scale = 1 if sys.platform == "darwin" else 1024  # Linux reports kilobytes, macOS bytes
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale


def _run_cpu(side: str, args: argparse.Namespace) -> dict:
    return run_side(side, args, torch.device("cpu"), measure_rss=True)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu", help="cpu or cuda[:i]")
    ap.add_argument("--size", type=int, default=64, help="image side (multiple of 32); 256 is the paper's")
    ap.add_argument("--channels", type=int, default=32, help="ADM base channels; 256 is the real ADM-256")
    ap.add_argument("--batch", type=int, default=2, help="images per call")
    ap.add_argument("--images", type=int, default=4, help="images timed (after the warm-up)")
    ap.add_argument("--warmup", type=int, default=1, help="untimed batches first (compilation happens here)")
    ap.add_argument("--timesteps", type=lambda s: [int(x) for x in s.split(",")], default=[50, 150, 250])
    ap.add_argument("--blocks", type=lambda s: [int(x) for x in s.split(",")], default=[5, 8, 12, 17])
    ap.add_argument("--output", choices=("dense", "native"), default="dense")
    ap.add_argument("--fast", choices=("auto", "on", "off"), default="auto", help="ours: the fast path")
    ap.add_argument("--compile", action="store_true", help="ours: torch.compile (needs the fast path)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=torch.get_num_threads(), help="CPU threads")
    ap.add_argument("--out", type=Path, default=None, help="append a record to this JSON list")
    args = ap.parse_args(argv)
    if args.warmup < 1:
        ap.error("--warmup must be at least 1")

    device = torch.device(args.device)
    results = {}
    for side in ("ours", "reference"):
        if device.type == "cuda":
            results[side] = run_side(side, args, device, measure_rss=False)
            torch.cuda.empty_cache()
        else:
            with ProcessPoolExecutor(max_workers=1, mp_context=mp.get_context("spawn")) as ex:
                results[side] = ex.submit(_run_cpu, side, args).result()
    ours_maps, ref_maps = results["ours"].pop("first_maps"), results["reference"].pop("first_maps")
    max_rel_err = max(float((a - b).norm() / b.norm()) for a, b in zip(ours_maps, ref_maps, strict=True))
    feature_dim = sum(m.shape[1] for m in ref_maps)
    ratio = results["ours"]["images_per_s"] / results["reference"]["images_per_s"]
    hardware = (torch.cuda.get_device_name(device) if device.type == "cuda"
                else f"cpu, {platform.platform()}, {args.threads} threads")
    memory_note = ("torch.cuda.max_memory_allocated() minus allocated before (weights)" if device.type == "cuda"
                   else "ru_maxrss increase in a fresh spawned process per side (process peak RSS)")

    print(f"ADM extraction: {args.images} images {args.size}x{args.size}, {args.channels} channels, "
          f"timesteps {args.timesteps}, blocks {args.blocks} (D={feature_dim}), {args.output} output, on {hardware}")
    print(f"{'side':<11}{'images/s':>10}{'seconds':>10}{'peak extra MiB':>16}  path")
    for side, r in results.items():
        print(f"{side:<11}{r['images_per_s']:>10.2f}{r['seconds']:>10.2f}{r['peak_extra_bytes'] / 2**20:>16.1f}"
              f"  {r['path']}")
    print(f"ours / reference images/s: {ratio:.2f}x; max relative difference of the maps: {max_rel_err:.2e}")
    print(f"memory: {memory_note}")

    if args.out is not None:
        def side(r: dict) -> dict:
            return {"path": r["path"], "seconds": round(r["seconds"], 4), "images_per_s": round(r["images_per_s"], 3),
                    "peak_gb": round(r["peak_extra_bytes"] / 2**30, 4)}

        record = {
            "benchmark": "adm_extract",
            "hardware": hardware,
            "date": time.strftime("%Y-%m-%d"),
            "size": args.size, "channels": args.channels, "batch": args.batch, "images": args.images,
            "timesteps": args.timesteps, "blocks": args.blocks, "feature_dim": feature_dim, "output": args.output,
            "torch": torch.__version__,
            "ours": side(results["ours"]),
            "reference": side(results["reference"]),
            "ratio_ours_over_reference": round(ratio, 4),
            "max_rel_err": max_rel_err,
            "memory_measure": memory_note,
            "load_avg_1m_at_end": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
        }
        records = json.loads(args.out.read_text()) if args.out.exists() else []
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(records + [record], indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
