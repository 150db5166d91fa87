"""Benchmark: a DreamBeast-modulated SDS step against a plain one, at MVDream's real size (random weights).

Same model (the MVDream sd-v2.1-base-4view layout of ``bench_sds.py``: SD2.1-base UNet with camera_embed, KL-f8
VAE), same settings, same seed, same sizes; the modulated run adds a 3-part part field (on a fresh NeRF's
geometry, so no cell is skipped: the worst case for rendering the maps) with DreamBeast's strengths (cross 0.6,
self 1.2) over the whole run. Time: plain and modulated one-step runs alternate in one process (load from other
processes hits both alike), one warm-up each, then the fastest of ``--steps`` per variant and stage (the node's
per-phase total, CUDA synchronised). Memory: on a GPU the node's peak allocated memory of those runs; on the CPU
the peak RSS of one process per variant. Prints the ratios (target: at most 1.15 both).

    .venv/bin/python scripts/bench_modulation.py --device cpu --steps 2
    .venv/bin/python scripts/bench_modulation.py --device auto --steps 20 --out modulation.json   # on a GPU
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_sds import settings, write_checkpoint  # noqa: E402
from harness.inprocess import init_comfy, run_node, use_folders  # noqa: E402

PROMPT = "a corgi body with a lion head and eagle wings, 3d asset"
PARTS = ("lion head", "eagle wings", "corgi body")
STAGES = {"64px x 8": dict(low_resolution=64, low_batch=8, high_from=1.0),
          "256px x 4": dict(high_resolution=256, high_batch=4, high_from=0.0)}
TARGET_RATIO = 1.15


def load(device: str):
    """(model with a report hook, clip, vae, positive, negative, reports, part field) of the benchmark model."""
    init_comfy(device)
    import torch

    import nodes as comfy_nodes
    from compose3d.kernels.field import config_for_device
    from compose3d.kernels.nerf import NeRF
    from compose3d.kernels.part_field import PartField
    from compose3d.nodes.common import compute_device
    from compose3d.nodes.mvdream import MVDreamLoader
    from compose3d.nodes.types import SDS_REPORT_KEY

    base = Path(tempfile.mkdtemp(prefix="bench_modulation_"))
    use_folders(base / "models", base / "output", base / "temp", base / "input")
    name = write_checkpoint(base / "models")
    model, clip, vae = run_node(MVDreamLoader, ckpt_name=name).result
    with torch.inference_mode():
        positive = comfy_nodes.CLIPTextEncode().encode(clip, PROMPT)[0]
        negative = comfy_nodes.CLIPTextEncode().encode(clip, "")[0]
    reports = []
    model = model.clone()
    model.model_options[SDS_REPORT_KEY] = reports.append
    dev = compute_device()
    field = PartField.on_geometry(NeRF.create(config_for_device(dev.type), device=dev, seed=1), PARTS, seed=2)
    return model, clip, vae, positive, negative, reports, field


def run_step(loaded, variant: str, stage: str):
    """One SDS step of ``variant`` at ``stage``; its report."""
    from compose3d.nodes.sds import SDSOptimizer

    model, clip, vae, positive, negative, reports, field = loaded
    extra = {}
    if variant == "modulated":
        extra = dict(part_field=field, clip=clip, prompt=PROMPT, parts=", ".join(PARTS), cross_strength=0.6,
                     self_strength=1.2, modulation_start=0.0, modulation_end=1.0)
    run_node(SDSOptimizer, model=model, vae=vae, positive=positive, negative=negative,
             **{**settings(1, STAGES[stage]), **extra})
    report = reports[-1]
    assert report.modulated_steps == (1 if variant == "modulated" else 0), report.text()
    return report


def timings(device: str, steps: int, stages: list[str]) -> dict:
    """Per stage and variant: the fastest of ``steps`` one-step runs, plain and modulated alternating (so load
    from other processes hits both alike), after one warm-up step each; with each phase of that step."""
    loaded = load(device)
    out = {}
    for stage in stages:
        best = {}
        for repeat in range(steps + 1):
            for variant in ("plain", "modulated"):
                report = run_step(loaded, variant, stage)
                seconds = sum(report.phases.values())
                if repeat and (variant not in best or seconds < best[variant]["seconds_per_step"]):
                    best[variant] = {"seconds_per_step": seconds, "phases": dict(report.phases),
                                     "peak_memory_bytes": report.peak_memory_bytes,
                                     "memory_kind": report.memory_kind}
        out[stage] = best
    return out


def peak_rss(variant: str, device: str, stages: list[str]) -> int:
    """The process's peak RSS after one step of ``variant`` per stage (CPU memory; run in a process of its own)."""
    import resource

    loaded = load(device)
    for stage in stages:
        run_step(loaded, variant, stage)
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu", choices=("cpu", "auto"))
    parser.add_argument("--steps", type=int, default=2, help="measured steps per stage and variant (after a warm-up)")
    parser.add_argument("--stages", default=",".join(STAGES), help="comma-separated stages to measure")
    parser.add_argument("--memory-of", choices=("plain", "modulated"), help=argparse.SUPPRESS)
    parser.add_argument("--out", help="write the figures as JSON here")
    args = parser.parse_args()
    stages = [s.strip() for s in args.stages.split(",") if s.strip()]
    if args.memory_of:  # a child process: one variant's peak RSS
        Path(args.out).write_text(json.dumps(peak_rss(args.memory_of, args.device, stages)))
        return
    started = time.perf_counter()
    results = timings(args.device, args.steps, stages)
    import torch

    cuda = torch.cuda.is_available() and args.device == "auto"
    rss = {}
    if not cuda:  # the CPU's peak RSS only grows: one process per variant
        for variant in ("plain", "modulated"):
            out = Path(tempfile.mkdtemp(prefix="bench_modulation_")) / f"{variant}.json"
            subprocess.run([sys.executable, __file__, "--memory-of", variant, "--device", args.device, "--stages",
                            ",".join(stages), "--out", str(out)], check=True)
            rss[variant] = json.loads(out.read_text())
    figures = {"device": torch.cuda.get_device_name() if cuda else "cpu", "steps": args.steps}
    for label in stages:
        plain, mod = results[label]["plain"], results[label]["modulated"]
        time_ratio = mod["seconds_per_step"] / plain["seconds_per_step"]
        figures[label] = {"plain": plain, "modulated": mod, "time_ratio": time_ratio}
        print(f"\n{label}: plain {plain['seconds_per_step']:.3f} s/step, modulated {mod['seconds_per_step']:.3f} "
              f"s/step -> time ratio {time_ratio:.3f} (target <= {TARGET_RATIO})")
        if cuda:
            ratio = mod["peak_memory_bytes"] / plain["peak_memory_bytes"]
            figures[label]["memory_ratio"] = ratio
            print(f"  peak GPU memory allocated {plain['peak_memory_bytes'] / 2 ** 30:.2f} -> "
                  f"{mod['peak_memory_bytes'] / 2 ** 30:.2f} GiB -> ratio {ratio:.3f} (target <= {TARGET_RATIO})")
        for phase in sorted(set(plain["phases"]) | set(mod["phases"])):
            print(f"  {phase:10s} {plain['phases'].get(phase, 0) * 1000:9.1f} ms -> "
                  f"{mod['phases'].get(phase, 0) * 1000:9.1f} ms")
    if rss:
        figures["peak_rss_bytes"] = rss
        figures["memory_ratio"] = rss["modulated"] / rss["plain"]
        print(f"\nprocess peak RSS over the stages: plain {rss['plain'] / 2 ** 30:.2f} GiB, modulated "
              f"{rss['modulated'] / 2 ** 30:.2f} GiB -> ratio {figures['memory_ratio']:.3f} (target <= "
              f"{TARGET_RATIO})")
    figures["seconds"] = time.perf_counter() - started
    print(f"benchmark took {figures['seconds']:.0f} s")
    if args.out:
        Path(args.out).write_text(json.dumps(figures, indent=2))


if __name__ == "__main__":
    main()
