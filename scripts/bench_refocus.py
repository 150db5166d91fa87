"""Benchmark: cost of refocused sampling (Compose3D_RefocusSampler) against plain DDIM with the same steps.
Prints times, their ratio, refinement tries, attention before/after and peak memory measured in this one run
(not a test; nothing fails on a slow machine).

Usage: python scripts/bench_refocus.py [--size tiny|small] [--steps N] [--views 4] [--device cpu|cuda]
                                       [--repeats N]

The model is MVDream in the released sd-v2.1-base-4view key layout with seeded random weights, written as a
.safetensors and loaded by the pack's real loader (load_mvdream). "tiny" is the test suite's model (64 base
channels, levels (1, 1, 2, 2), one res-block per level); "small" is SD2.1's level structure (channel multipliers
(1, 2, 4, 4), two res-blocks per level, attention at the first three levels) at 128 base channels instead of 320
(136 M UNet parameters). Defaults: small, 50 steps, 3 repeats on CUDA; tiny, 20 steps, 1 repeat on the CPU (small
runs there too, at several seconds per plain step on 2 cores).
The prompt is encoded with the checkpoint's CLIP (core CLIPTextEncode), the views get an orbit rig through
Compose3D_MVDreamConditioning (positive and negative), and core SamplerCustom samples 256x256 (32x32 latents)
three ways with the same seed, steps, cfg and ddim_uniform sigmas:

  plain           KSamplerSelect "ddim"
  refocus         Compose3D_RefocusSampler(ddim), refocus_steps = steps / 2, thresholds "" (no refinement)
  refocus+refine  the same with the reference settings: thresholds "0: 0.05, 10: 0.5, 20: 0.8", max_tries 20

All inside torch.inference_mode(), as ComfyUI runs nodes. Each variant runs in its own process (one warm-up
sampling of 2 steps, then --repeats timed runs), so its peak memory is its own: on CUDA the allocator peak of the
timed runs, on the CPU the RSS peak while sampling above the RSS of the loaded model (sampled every 10 ms) and
the process's whole peak (ru_maxrss, which includes loading). Times are the fastest timed run; each refocusing
update (forward + backward) is also timed on its own, to split a run into updates and sampler steps. On a shared
CPU, compare cpu/wall between variants: if it differs, other load distorted the times. With random weights the
attention numbers say nothing about image quality; they show that the mechanism runs and what the tries cost
(the reference thresholds at steps 10 and 20 only apply with more than 20 and 40 steps).
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root, for the harness package
from harness.inprocess import init_comfy, run_node  # noqa: E402

PROMPT = "a cat and a dog sitting on a wooden bench"
SUBJECTS = "cat, dog"
NEGATIVE = ""
REFERENCE_THRESHOLDS = "0: 0.05, 10: 0.5, 20: 0.8"
REFERENCE_MAX_TRIES = 20
STEP_SIZE = 20.0
SMOOTHING_SIGMA = 0.5
CFG = 7.5
SEED = 1234
RESOLUTION = 256  # pixels; 32x32 latents as MVDream's 256x256 views
VARIANTS = ("plain", "refocus", "refocus+refine")

#: UNet shapes (ComfyUI UNetModel arguments) and text widths; None is the test suite's tiny UNet
#: (harness/tiny_models.TINY_MVDREAM_SHAPE).
SIZES = {
    "tiny": (None, 64),
    "small": (dict(model_channels=128, channel_mult=[1, 2, 4, 4], num_res_blocks=[2, 2, 2, 2],
                   transformer_depth=[1, 1, 1, 1, 1, 1, 0, 0], transformer_depth_middle=1,
                   transformer_depth_output=[1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0]), 128),
}


# ------------------------------------------------------------------------------------------------ model

def build_checkpoint(size: str, path: Path, seed: int = 21) -> int:
    """Write an MVDream sd-v2.1-base-4view-layout checkpoint of ``size`` to ``path``; returns UNet parameters.

    The builder is the test suite's (harness/tiny_models.py), so "tiny" is exactly the tests' model."""
    from safetensors.torch import save_file

    from harness.tiny_models import UNET_PREFIX, mvdream_checkpoint_state_dict

    shape, text_width = SIZES[size]
    sd = mvdream_checkpoint_state_dict("sd21", seed, shape=shape, text_width=text_width)
    save_file(sd, str(path), metadata={"compose3d": f"bench_refocus {size} mvdream"})
    return sum(t.numel() for k, t in sd.items() if k.startswith(UNET_PREFIX))


# ------------------------------------------------------------------------------------------------ one variant

class RSSPeak:
    """Highest resident set size seen (polled from /proc/self/statm) while running."""

    def __init__(self, interval: float = 0.01):
        self.interval, self.peak, self._stop = interval, 0, threading.Event()
        self._page = os.sysconf("SC_PAGE_SIZE")
        self._thread = threading.Thread(target=self._poll, daemon=True)

    def rss(self) -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * self._page

    def _poll(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, self.rss())
            time.sleep(self.interval)

    def __enter__(self):
        self.peak = self.rss()
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.rss())


def run_variant(variant: str, checkpoint: str, steps: int, views: int, repeats: int, device: str,
                latent_out: str) -> dict:
    init_comfy("cpu" if device == "cpu" else "auto")
    import torch

    import nodes as comfy_nodes
    from comfy_extras.nodes_custom_sampler import BasicScheduler, KSamplerSelect, SamplerCustom

    from compose3d.kernels.cameras import orbit_cameras
    from compose3d.nodes.mvdream import MVDreamConditioning
    from compose3d.nodes.mvdream_model import load_mvdream
    from compose3d.nodes.refocus import RefocusSampler
    from compose3d.nodes.types import REFOCUS_REPORT_KEY

    cuda = device == "cuda"
    refocus_steps = steps // 2

    # Instrumentation only: time each refocusing update (one forward + backward) by wrapping the method.
    import compose3d.nodes.refocus as refocus_module

    update_times: list[float] = []
    update = refocus_module.Refocuser.update

    def timed_update(self, *a, **k):
        if cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        out = update(self, *a, **k)
        if cuda:
            torch.cuda.synchronize()
        update_times.append(time.perf_counter() - start)
        return out

    refocus_module.Refocuser.update = timed_update

    def sampler_for(variant: str, refocus_steps: int):
        if variant == "plain":
            return run_node(KSamplerSelect, sampler_name="ddim").result[0]
        thresholds, max_tries = ("", 0) if variant == "refocus" else (REFERENCE_THRESHOLDS, REFERENCE_MAX_TRIES)
        return run_node(RefocusSampler, clip=clip, prompt=PROMPT, subjects=SUBJECTS, sampler_name="ddim",
                        refocus_steps=refocus_steps, step_size=STEP_SIZE, thresholds=thresholds,
                        max_tries=max_tries, smoothing_sigma=SMOOTHING_SIGMA).result[0]

    def sample(sampler, n_steps: int):
        sigmas = run_node(BasicScheduler, model=model, scheduler="ddim_uniform", steps=n_steps,
                          denoise=1.0).result[0]
        out = run_node(SamplerCustom, model=model, add_noise=True, noise_seed=SEED, cfg=CFG, positive=positive,
                       negative=negative, sampler=sampler, sigmas=sigmas, latent_image=latent).result[0]
        if cuda:
            torch.cuda.synchronize()
        return out["samples"]

    reports = []
    with torch.inference_mode():
        model, clip, _vae = load_mvdream(checkpoint)
        model.model_options[REFOCUS_REPORT_KEY] = reports.append  # each refocused run's report
        cams = orbit_cameras(views, 15.0, 0.0, 360.0, 2.0, 40.0)
        positive = run_node(MVDreamConditioning, conditioning=comfy_nodes.CLIPTextEncode().encode(clip, PROMPT)[0],
                            cameras=cams).result[0]
        negative = run_node(MVDreamConditioning, conditioning=comfy_nodes.CLIPTextEncode().encode(clip, NEGATIVE)[0],
                            cameras=cams).result[0]
        latent = comfy_nodes.EmptyLatentImage().generate(RESOLUTION, RESOLUTION, views)[0]

        with RSSPeak() as rss:
            loaded_rss = rss.peak
            # Warm-up: 2 steps of the same kind (refocusing one step, no refinement), loads the model on the device.
            sample(sampler_for("plain" if variant == "plain" else "refocus", 1), 2)
            if cuda:
                resident = torch.cuda.memory_allocated()
                torch.cuda.reset_peak_memory_stats()
            times, cpu_times = [], []
            update_times.clear()
            for _ in range(repeats):
                sampler = sampler_for(variant, refocus_steps)
                start, cpu_start = time.perf_counter(), time.process_time()
                samples = sample(sampler, steps)
                times.append(time.perf_counter() - start)
                cpu_times.append(time.process_time() - cpu_start)
        torch.save(samples.float().cpu().clone(), latent_out)

    result = {"seconds": min(times), "mean_seconds": sum(times) / len(times),
              "cpu_per_wall": sum(cpu_times) / sum(times),
              "refocus_steps": refocus_steps, "updates_per_run": len(update_times) / repeats,
              "update_seconds": sum(update_times) / max(1, len(update_times)),
              "unet_dtype": str(model.model.get_dtype()), "threads": torch.get_num_threads(),
              "ru_maxrss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}
    if cuda:
        result.update(peak_bytes=torch.cuda.max_memory_allocated(), resident_bytes=resident,
                      gpu=torch.cuda.get_device_name())
    else:
        result.update(peak_bytes=rss.peak, resident_bytes=loaded_rss)
    if variant != "plain" and reports:
        report = reports[-1]
        result.update(steps=report.steps, tries=report.tries, before=report.before, refined=report.refined)
    return result


# ------------------------------------------------------------------------------------------------ main

def fmt(values) -> str:
    return " ".join(f"{v:.3f}" for v in values)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", choices=sorted(SIZES), help="UNet size (default small on cuda, tiny on cpu)")
    parser.add_argument("--steps", type=int, help="sampling steps (default 50 on cuda, 20 on cpu)")
    parser.add_argument("--views", type=int, default=4)
    parser.add_argument("--device", choices=("cpu", "cuda"))
    parser.add_argument("--repeats", type=int, help="timed runs per variant after a warm-up (default 3 cuda, 1 cpu)")
    parser.add_argument("--variant", help=argparse.SUPPRESS)
    parser.add_argument("--checkpoint", help=argparse.SUPPRESS)
    parser.add_argument("--latent-out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.device is None:
        import torch

        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    args.size = args.size or ("small" if args.device == "cuda" else "tiny")
    args.steps = args.steps or (50 if args.device == "cuda" else 20)
    args.repeats = args.repeats or (3 if args.device == "cuda" else 1)
    if args.steps < 2:
        parser.error("--steps: at least 2 (half of them are refocused)")
    if args.variant:
        print(json.dumps(run_variant(args.variant, args.checkpoint, args.steps, args.views, args.repeats,
                                     args.device, args.latent_out)))
        return

    init_comfy("cpu")  # this process only writes the checkpoint (meta-device UNet, CPU tensors)
    import torch

    results, latents = {}, {}
    with tempfile.TemporaryDirectory(prefix="bench_refocus-") as tmp:
        checkpoint = Path(tmp) / f"mvdream_{args.size}.safetensors"
        t0 = time.perf_counter()
        parameters = build_checkpoint(args.size, checkpoint)
        print(f"model: {args.size} MVDream (sd-v2.1-base-4view layout, random weights), {parameters / 1e6:.1f} M "
              f"UNet parameters, written in {time.perf_counter() - t0:.1f} s")
        for variant in VARIANTS:
            latent_out = Path(tmp) / f"{variant}.pt"
            cmd = [sys.executable, __file__, "--variant", variant, "--checkpoint", str(checkpoint),
                   "--latent-out", str(latent_out), "--size", args.size, "--steps", str(args.steps),
                   "--views", str(args.views), "--device", args.device, "--repeats", str(args.repeats)]
            out = subprocess.run(cmd, capture_output=True, text=True)
            if out.returncode:
                sys.exit(f"variant {variant} failed:\n{out.stderr[-4000:]}")
            results[variant] = json.loads(out.stdout.strip().splitlines()[-1])
            latents[variant] = torch.load(latent_out)

    first = results["plain"]
    refocus_steps = first["refocus_steps"]
    where = first.get("gpu", f"{first['threads']} threads")
    print(f"device {args.device} ({where}), torch {torch.__version__}, UNet {first['unet_dtype']}; "
          f"{args.views} views at {RESOLUTION}x{RESOLUTION}, ddim, {args.steps} steps, cfg {CFG}, seed {SEED}; "
          f"refocus_steps {refocus_steps}, prompt {PROMPT!r}, subjects {SUBJECTS!r}; "
          f"{args.repeats} timed run(s) after a 2-step warm-up, each variant in its own process")
    print(f"{'variant':15} {'s/run':>8} {'mean':>8} {'x plain':>8} {'cpu/wall':>9} {'tries':>6} {'peak MiB':>9} "
          f"{'over model MiB':>15} {'latent RMS diff vs plain':>25}")
    for variant, r in results.items():
        tries = sum(r.get("tries", [])) if variant != "plain" else 0
        diff = (latents[variant] - latents["plain"]).square().mean().sqrt().item()
        print(f"{variant:15} {r['seconds']:8.2f} {r['mean_seconds']:8.2f} {r['seconds'] / first['seconds']:8.2f} "
              f"{r['cpu_per_wall']:9.2f} {tries:6d} {r['peak_bytes'] / 2**20:9.0f} "
              f"{(r['peak_bytes'] - r['resident_bytes']) / 2**20:15.0f} {diff:25.4f}")
    print("time: s/run = fastest timed run (mean = their mean), x plain = ratio of the fastest runs; cpu/wall = "
          "process CPU seconds per wall second while sampling")
    if args.device == "cpu":
        low = [v for v, r in results.items() if r["cpu_per_wall"] < 0.8 * first["threads"]]
        spread = max(r["cpu_per_wall"] for r in results.values()) / min(r["cpu_per_wall"] for r in results.values())
        if low or spread > 1.25:
            print(f"WARNING: cpu/wall differs between variants or is below the {first['threads']} threads"
                  f"{' for ' + ', '.join(low) if low else ''}: other processes took CPU time during this run (and "
                  f"waiting threads may spin, counting as CPU time), so the times and ratios are unreliable; rerun "
                  f"on an idle machine or with more --repeats")
    if args.device == "cuda":
        print("memory: peak = torch.cuda.max_memory_allocated over the timed runs (weights included); over model "
              "= peak minus what was allocated after the warm-up (mostly the weights)")
    else:
        print("memory: peak = highest RSS while sampling (polled every 10 ms); over model = that minus the RSS of "
              "the loaded model and encoded prompt before the first sampling; whole-process peaks (ru_maxrss, "
              "loading included): " + ", ".join(f"{v} {r['ru_maxrss'] / 2**20:.0f} MiB"
                                                 for v, r in results.items()))

    names = [s.strip() for s in SUBJECTS.split(",")]
    for variant in VARIANTS[1:]:
        r = results[variant]
        print(f"{variant}: attention of {'/'.join(names)} in the weakest view (objects averaged), before the "
              f"step's first update -> after its refinement tries:")
        for step, before, refined, tries in zip(r["steps"], r["before"], r["refined"], r["tries"]):
            if step in (r["steps"][0], r["steps"][-1]) or tries or step % 5 == 0:
                print(f"  step {step:3d}: {fmt(before)} -> {fmt(refined)}  ({tries} tries)")
    thresholds = {int(k.split(":")[0]) for k in REFERENCE_THRESHOLDS.split(",")}
    live = sorted(s for s in thresholds if s < refocus_steps)
    print(f"thresholds at steps {sorted(thresholds)}: {live or 'none'} within the {refocus_steps} refocused steps"
          + (f" ({sorted(thresholds - set(live))} never apply at {args.steps} steps)" if set(live) != thresholds
             else ""))

    # Where the cost comes from: the refocusing updates are timed one by one (Refocuser.update wrapped), so a run
    # splits into updates + everything else (the sampler's steps, which should cost what the plain run costs).
    plain_step = first["mean_seconds"] / args.steps
    for variant in VARIANTS[1:]:
        r = results[variant]
        updates = r["updates_per_run"] * r["update_seconds"]
        print(f"split {variant}: {r['updates_per_run']:.0f} updates x {r['update_seconds']:.2f} s = {updates:.2f} s "
              f"(one update = {r['update_seconds'] / plain_step:.2f} plain steps of {plain_step:.2f} s) + "
              f"{r['mean_seconds'] - updates:.2f} s for the {args.steps} sampler steps and the rest "
              f"(plain run: {first['mean_seconds']:.2f} s; means over the timed runs)")
    tries = sum(results["refocus+refine"].get("tries", []))
    print(f"cost: each of the {refocus_steps} refocused steps adds one update = a conditional-only forward + backward "
          f"through the UNet (V latents instead of the 2V of a cfg step; explicit fp32 attention at 1/4 "
          f"resolution to keep the maps; per-call weight copies so autograd can use ComfyUI's inference-mode "
          f"weights); the reference thresholds add {tries} refinement tries here, each one more update; memory "
          f"grows by the activations kept for the backward")


if __name__ == "__main__":
    main()
