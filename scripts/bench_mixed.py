"""Benchmark: one mixed-score step against one MVDream step plus one 2D step, at real sizes (random weights).

Models: MVDream in the sd-v2.1-base-4view layout (``bench_sds.write_checkpoint``: SD2.1-base UNet with
camera_embed) and an SD2.1-base UNet as the 2D model (loaded by ComfyUI's diffusion-model loader), 4 views of
256 px (32x32 latents), CFG on both (each model denoises cond and uncond: a batch of 8). The conditionings are
seeded random 77x1024 contexts (the text encoder's cost is not part of a sampling step).

Time: inside one sampling run per variant, a sampler calls the guider ``--steps`` times at t = 981, 961, ...
(DDIM's first steps) and each call is timed (CUDA synchronised); the fastest call of each variant is kept.
Variants alternate in one process (plain MVDream, plain 2D, mixed with lambda 0.5, mixed with the consistency
term) so load from other processes hits them alike. Prints mixed / (MVDream + 2D) (target at most 1.05).

Memory: peak allocated GPU memory of each variant in ComfyUI's normal and --lowvram modes (a process per
mode); on the CPU the process's RSS sampled during one step of each variant, with both models loaded (lowvram is
a GPU mode).

    .venv/bin/python scripts/bench_mixed.py --device cpu --steps 3
    .venv/bin/python scripts/bench_mixed.py --device auto --steps 10 --out mixed.json     # on a GPU
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

from bench_sds import SD21_SHAPE, write_checkpoint  # noqa: E402

VARIANTS = ("mvdream", "2d", "mixed", "mixed+consistency")
TARGET_RATIO = 1.05
VIEWS, SIZE = 4, 256


def setup(device: str, vram: str):
    from harness.paths import add_comfyui_to_sys_path

    add_comfyui_to_sys_path()
    import comfy.cli_args

    if vram == "lowvram":
        comfy.cli_args.args.lowvram = True
    from harness.inprocess import init_comfy, run_node, use_folders

    init_comfy(device)
    import torch
    from safetensors.torch import save_file

    import comfy.sd
    from compose3d.kernels.cameras import orbit_cameras
    from compose3d.nodes.mvdream import MVDreamConditioning, MVDreamLoader
    from harness.tiny_models import mvdream_unet_state_dict

    base = Path(tempfile.mkdtemp(prefix="bench_mixed_"))
    use_folders(base / "models", base / "output", base / "temp", base / "input")
    mv, _clip, _vae = run_node(MVDreamLoader, ckpt_name=write_checkpoint(base / "models")).result
    unet = mvdream_unet_state_dict(family="sd21", seed=210, context_dim=1024, shape=SD21_SHAPE)
    unet = {k: v for k, v in unet.items() if not k.startswith("camera_embed.")}
    path = base / "models" / "diffusion_models" / "bench_sd21_unet.safetensors"
    save_file(unet, str(path))
    del unet
    model_2d = comfy.sd.load_diffusion_model(str(path))
    gen = torch.Generator().manual_seed(0)
    context = [torch.randn(1, 77, 1024, generator=gen) for _ in range(4)]
    rig = orbit_cameras(VIEWS, 15.0, 0.0, 360.0, 2.5, 40.0)
    mv_pos = run_node(MVDreamConditioning, conditioning=[[context[0], {}]], cameras=rig).result[0]
    mv_neg = run_node(MVDreamConditioning, conditioning=[[context[1], {}]], cameras=rig).result[0]
    return {"mv": mv, "model_2d": model_2d, "mv_positive": mv_pos, "mv_negative": mv_neg,
            "positive_2d": [[context[2], {}]], "negative_2d": [[context[3], {}]]}


def guider(loaded, variant: str):
    import comfy.samplers
    from compose3d.kernels.score_mixing import LambdaSchedule
    from compose3d.nodes.mixed_score import MixSettings, make_guider

    if variant == "mvdream":
        g = comfy.samplers.CFGGuider(loaded["mv"])
        g.set_conds(loaded["mv_positive"], loaded["mv_negative"])
        g.set_cfg(7.5)
        return g
    if variant == "2d":
        g = comfy.samplers.CFGGuider(loaded["model_2d"])
        g.set_conds(loaded["positive_2d"], loaded["negative_2d"])
        g.set_cfg(7.5)
        return g
    weight = 0.5 if variant == "mixed+consistency" else 0.0
    return make_guider(loaded["mv"], loaded["model_2d"], loaded["mv_positive"], loaded["mv_negative"],
                       loaded["positive_2d"], loaded["negative_2d"],
                       MixSettings(LambdaSchedule("constant", 0.5), 7.5, 7.5, weight))


#: Seconds of each ``comfy.samplers.sampling_function`` call (one model's CFG prediction) of the last timed call.
MODEL_CALLS: list[float] = []


def _time_model_calls() -> None:
    """Time every one-model prediction (the guider calls ComfyUI's ``sampling_function`` once per model pass)."""
    import torch

    import comfy.samplers

    real = comfy.samplers.sampling_function

    def timed(*args, **kwargs):
        cuda = torch.cuda.is_available() and args[1].is_cuda
        if cuda:
            torch.cuda.synchronize()
        started = time.perf_counter()
        out = real(*args, **kwargs)
        if cuda:
            torch.cuda.synchronize()
        MODEL_CALLS.append(time.perf_counter() - started)
        return out

    comfy.samplers.sampling_function = timed


def timed_calls(loaded, variant: str, calls: int, parts: dict | None = None) -> list[float]:
    """Seconds of each of ``calls`` guider calls inside one sampling run of ``variant``; ``parts`` (if given)
    gets, for the fastest call, the seconds of its model passes in order."""
    import torch

    import comfy.model_management
    import comfy.samplers

    g = guider(loaded, variant)
    device = comfy.model_management.get_torch_device()
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    sampling = loaded["mv"].get_model_object("model_sampling")
    seconds = []

    def function(model, x, sigmas, extra_args=None, callback=None, disable=None):
        for i in range(calls):
            comfy.model_management.throw_exception_if_processing_interrupted()
            sigma = sigmas[min(i, len(sigmas) - 2)] * torch.ones(x.shape[0], device=x.device)
            sync()
            MODEL_CALLS.clear()
            started = time.perf_counter()
            model(x, sigma, **(extra_args or {}))
            sync()
            seconds.append(time.perf_counter() - started)
            if parts is not None and seconds[-1] == min(seconds):
                parts[variant] = list(MODEL_CALLS)
        return x

    sigmas = comfy.samplers.calculate_sigmas(sampling, "ddim_uniform", 50)
    latent = torch.zeros(VIEWS, 4, SIZE // 8, SIZE // 8)
    noise = torch.randn(latent.shape, generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        g.sample(noise, latent, comfy.samplers.KSAMPLER(function), sigmas, seed=1)
    return seconds


def peak_gpu_memory(device: str, vram: str) -> dict:
    """Peak allocated GPU memory of one step of each variant (models unloaded and the peak reset in between),
    in ComfyUI's ``vram`` mode (run in a process of its own: the mode is fixed at start-up)."""
    import torch

    loaded = setup(device, vram)  # puts ComfyUI on sys.path and fixes the vram mode before comfy is imported
    import comfy.model_management
    out = {}
    for v in VARIANTS:
        comfy.model_management.unload_all_models()
        comfy.model_management.soft_empty_cache()
        torch.cuda.reset_peak_memory_stats()
        timed_calls(loaded, v, 1)
        out[v] = torch.cuda.max_memory_allocated()
    return out


def rss_peak_during(fn) -> tuple[int, int]:
    """(RSS before, peak RSS while ``fn()`` runs), in bytes, sampling /proc/self/status every 5 ms (Linux)."""
    import threading

    def rss() -> int:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
        return 0

    before, peak, done = rss(), [0], threading.Event()

    def watch():
        while not done.is_set():
            peak[0] = max(peak[0], rss())
            time.sleep(0.005)

    thread = threading.Thread(target=watch, daemon=True)
    thread.start()
    try:
        fn()
    finally:
        done.set()
        thread.join()
    return before, max(peak[0], before)


def child(args, **extra) -> dict:
    out = Path(tempfile.mkdtemp(prefix="bench_mixed_")) / "figures.json"
    command = [sys.executable, __file__, "--device", args.device, "--out", str(out), "--child"]
    for key, value in extra.items():
        command += [f"--{key}", str(value)]
    subprocess.run(command, check=True)
    return json.loads(out.read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu", choices=("cpu", "auto"))
    parser.add_argument("--steps", type=int, default=3, help="timed guider calls per variant (after a warm-up run)")
    parser.add_argument("--out", help="write the figures as JSON here")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--vram", default="normal", help=argparse.SUPPRESS)
    parser.add_argument("--no-memory", action="store_true", help="time only (no peak-memory processes)")
    args = parser.parse_args()
    if args.child:
        Path(args.out).write_text(json.dumps(peak_gpu_memory(args.device, args.vram)))
        return
    started = time.perf_counter()
    loaded = setup(args.device, "normal")
    _time_model_calls()
    best = {v: float("inf") for v in VARIANTS}
    parts: dict = {}
    for repeat in range(2):  # the first round warms up
        for v in VARIANTS:
            calls = timed_calls(loaded, v, 1 if repeat == 0 else args.steps, parts if repeat else None)
            if repeat:
                best[v] = min(calls)
    import torch

    cuda = torch.cuda.is_available() and args.device == "auto"
    figures = {"device": torch.cuda.get_device_name() if cuda else "cpu", "calls": args.steps,
               "seconds_per_call": best, "model_passes": parts}
    sum_two = best["mvdream"] + best["2d"]
    figures["ratio"] = best["mixed"] / sum_two
    # the single-view pass is cheaper than a multi-view one (attention over one view's tokens): its own time
    single = parts["mixed+consistency"][-1] if len(parts.get("mixed+consistency", [])) == 3 else best["mvdream"]
    figures["ratio_with_consistency"] = best["mixed+consistency"] / (sum_two + single)
    print(f"\none step, {VIEWS} views of {SIZE} px, CFG on both models (fastest of {args.steps} calls):")
    for v in VARIANTS:
        passes = " + ".join(f"{p:.3f}" for p in parts.get(v, []))
        print(f"  {v:18s} {best[v]:8.3f} s   (model passes: {passes} s)")
    print(f"mixed / (MVDream + 2D) = {best['mixed']:.3f} / {sum_two:.3f} = {figures['ratio']:.3f} "
          f"(target <= {TARGET_RATIO})")
    print(f"mixed+consistency / (MVDream + 2D + single-view MVDream pass) = "
          f"{figures['ratio_with_consistency']:.3f}")
    if args.no_memory:
        pass
    elif cuda:
        del loaded
        figures["peak_memory_bytes"] = {mode: child(args, vram=mode) for mode in ("normal", "lowvram")}
        for mode, peaks in figures["peak_memory_bytes"].items():
            print(f"peak GPU memory allocated, {mode}: " + ", ".join(f"{v} {b / 2 ** 30:.2f} GiB"
                                                                    for v, b in peaks.items()))
    else:  # one process, both models loaded: the memory a step adds on top of them
        rss = {v: rss_peak_during(lambda v=v: timed_calls(loaded, v, 1)) for v in VARIANTS}
        figures["rss_bytes_before_and_peak"] = rss
        print("process RSS during one step (CPU; lowvram is a GPU mode), peak and growth over the loaded models: "
              + ", ".join(f"{v} {p / 2 ** 30:.2f} GiB (+{(p - b) / 2 ** 30:.2f})" for v, (b, p) in rss.items()))
    figures["seconds"] = time.perf_counter() - started
    print(f"benchmark took {figures['seconds']:.0f} s")
    if args.out:
        Path(args.out).write_text(json.dumps(figures, indent=2))


if __name__ == "__main__":
    main()
