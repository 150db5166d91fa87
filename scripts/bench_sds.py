"""Benchmark: one SDS step of Compose3D_SDSOptimizer at MVDream's real size (random weights), at 64 and 256 px.

The model is an MVDream sd-v2.1-base-4view checkpoint in the released key layout: SD2.1-base UNet (865 M
parameters, with camera_embed), SD's KL-f8 VAE (128 channels), a narrow 1024-wide text encoder (its size does not
enter an SDS step). It is written as safetensors, loaded by the pack's loader and run by the real node with
MVDream's settings (guidance 50, x0 reconstruction, 64 samples per ray, learned background). Each stage runs
``--steps`` steps after a one-step warm-up run; the node's report hook gives the time per phase (render, encode,
unet, backward, optimizer; CUDA synchronised per phase) and the peak memory (GPU allocated, or process RSS on the
CPU). The figures project MVDream's schedule (5,000 steps at 64 px x 8 + 5,000 at 256 px x 4) against the
targets: 15 minutes and 16 GB of VRAM on one H100.

    .venv/bin/python scripts/bench_sds.py --device cpu --steps 2
    .venv/bin/python scripts/bench_sds.py --device auto --steps 20 --out sds.json   # on a GPU machine
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from harness.inprocess import init_comfy, run_node, use_folders  # noqa: E402

#: SD2.1-base's UNet as ComfyUI's UNetModel arguments (MVDream sd-v2.1-base-4view adds camera_embed).
SD21_SHAPE = dict(model_channels=320, channel_mult=[1, 2, 4, 4], num_res_blocks=[2, 2, 2, 2],
                  transformer_depth=[1, 1, 1, 1, 1, 1, 0, 0], transformer_depth_middle=1,
                  transformer_depth_output=[1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0])
STAGES = {"64px x 8": dict(low_resolution=64, low_batch=8, high_from=1.0),
          "256px x 4": dict(high_resolution=256, high_batch=4, high_from=0.0)}
TARGET_SECONDS = 15 * 60
TARGET_VRAM = 16 * 2 ** 30


def kl_vae_state_dict(seed: int):
    """SD's KL-f8 autoencoder (ComfyUI's AutoencoderKL, the keys its VAE detection expects), seeded random."""
    import torch
    from comfy.ldm.models.autoencoder import AutoencoderKL

    from harness.tiny_models import fill_seeded

    ddconfig = {"double_z": True, "z_channels": 4, "resolution": 256, "in_channels": 3, "out_ch": 3, "ch": 128,
                "ch_mult": [1, 2, 4, 4], "num_res_blocks": 2, "attn_resolutions": [], "dropout": 0.0}
    with torch.device("meta"):
        vae = AutoencoderKL(ddconfig=ddconfig, embed_dim=4)
    sd = {k: torch.empty(v.shape, dtype=v.dtype) for k, v in vae.state_dict().items()}
    return fill_seeded(sd, seed, dtype=torch.float32)


def write_checkpoint(models: Path) -> str:
    from safetensors.torch import save_file

    from harness.tiny_models import VAE_PREFIX, mvdream_checkpoint_state_dict, prefixed

    sd = mvdream_checkpoint_state_dict("sd21", seed=21, shape=SD21_SHAPE, text_width=1024)
    sd = {k: v for k, v in sd.items() if not k.startswith(VAE_PREFIX)}
    sd.update(prefixed(VAE_PREFIX, kl_vae_state_dict(1021)))
    name = "bench_mvdream_sd21.safetensors"
    (models / "checkpoints").mkdir(parents=True, exist_ok=True)
    save_file(sd, str(models / "checkpoints" / name))
    return name


def settings(steps: int, stage: dict) -> dict:
    from compose3d.nodes.sds import SDSOptimizer

    values = {spec.id: spec.default for spec in SDSOptimizer.define_schema().inputs
              if getattr(spec, "default", None) is not None}
    values.update(steps=steps, checkpoint_every=0, seed=0, **stage)
    return values


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu", choices=("cpu", "auto"))
    parser.add_argument("--steps", type=int, default=2, help="measured steps per stage (after a warm-up step)")
    parser.add_argument("--out", help="also write the figures as JSON here")
    args = parser.parse_args()
    init_comfy(args.device)
    import torch

    import nodes as comfy_nodes
    from compose3d.nodes.mvdream import MVDreamLoader
    from compose3d.nodes.sds import SDSOptimizer
    from compose3d.nodes.types import SDS_REPORT_KEY

    base = Path(tempfile.mkdtemp(prefix="bench_sds_"))
    use_folders(base / "models", base / "output", base / "temp", base / "input")
    started = time.perf_counter()
    name = write_checkpoint(base / "models")
    model, clip, vae = run_node(MVDreamLoader, ckpt_name=name).result
    print(f"model written and loaded in {time.perf_counter() - started:.0f} s; device "
          f"{torch.cuda.get_device_name() if torch.cuda.is_available() and args.device == 'auto' else 'cpu'}")
    with torch.inference_mode():
        positive = comfy_nodes.CLIPTextEncode().encode(clip, "a DSLR photo of a corgi, 3d asset")[0]
        negative = comfy_nodes.CLIPTextEncode().encode(clip, "")[0]
    reports = []
    model = model.clone()
    model.model_options[SDS_REPORT_KEY] = reports.append
    figures = {}
    for label, stage in STAGES.items():
        run_node(SDSOptimizer, model=model, vae=vae, positive=positive, negative=negative, **settings(1, stage))
        run_node(SDSOptimizer, model=model, vae=vae, positive=positive, negative=negative,
                 **settings(args.steps, stage))
        report = reports[-1]
        per_step = sum(report.phases.values()) / report.steps
        phases = {k: v / report.steps for k, v in report.phases.items()}
        figures[label] = {"seconds_per_step": per_step, "wall_seconds_per_step": report.seconds / report.steps,
                          "phases": phases, "peak_memory_bytes": report.peak_memory_bytes,
                          "memory_kind": report.memory_kind}
        print(f"\n{label}: {per_step:.3f} s/step (wall {report.seconds / report.steps:.3f}), peak memory "
              f"({report.memory_kind}) {report.peak_memory_bytes / 2 ** 30:.2f} GiB")
        for k, v in sorted(phases.items(), key=lambda kv: -kv[1]):
            print(f"  {k:10s} {v * 1000:9.1f} ms  {100 * v / per_step:5.1f} %")
    projected = 5000 * figures["64px x 8"]["wall_seconds_per_step"] + 5000 * figures["256px x 4"][
        "wall_seconds_per_step"]
    peak = max(f["peak_memory_bytes"] for f in figures.values())
    figures["projected_10000_steps_seconds"] = projected
    figures["ratio_to_15_min_target"] = projected / TARGET_SECONDS
    print(f"\nMVDream's 10,000 steps projected: {projected / 60:.1f} min = {projected / TARGET_SECONDS:.2f} x the "
          f"15-minute target; peak memory {peak / 2 ** 30:.2f} GiB"
          + (f" ({'within' if peak <= TARGET_VRAM else 'over'} the 16 GB target)" if args.device == "auto" else ""))
    if args.out:
        Path(args.out).write_text(json.dumps(figures, indent=2))


if __name__ == "__main__":
    main()
