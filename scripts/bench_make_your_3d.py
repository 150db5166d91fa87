"""Benchmark: time per tuning step and peak memory of Make-Your-3D's two tuners at real model size (random weights).

Models (seeded random weights, real shapes, written as safetensors into a temporary folder and deleted at the end):

* identity tuning (``Compose3D_IdentityTuner``): an SD1.5 LDM checkpoint (the SD1.5 UNet, 860 M parameters; a
  TAESD VAE; the real-size CLIP-L text encoder) loaded by core CheckpointLoaderSimple (so ComfyUI's model
  management and dtype choice apply), a real-size IP-Adapter (basic layout, 4 tokens, 16 cross-attention layers
  in diffusers' order, 768-wide image embeddings) loaded by Compose3D_IPAdapterLoader, and a random CLIP ViT-L/14
  image encoder loaded by core CLIPVisionLoader. 4 views, batch_size 4, augmentations 2 (8 image embeddings).
* subject-prior tuning (``Compose3D_SubjectPriorTuner``): MVDream sd-v1.5-4view (the SD1.5 UNet with
  camera_embed; TAESD; a 3-layer 768-wide CLIP-L text encoder, which only encodes the two prompts before the loop)
  loaded by Compose3D_MVDreamLoader; 4 views with ``orbit_cameras(4)``, views_per_step 4, LoRA rank 8 (alpha 8),
  no normal maps (with normals a step does a second forward and backward).

The views are seeded random images of ``--size`` px (default 512 on a GPU, 256 on the CPU); their content does not
change the cost. Each tuner runs in a process of its own (clean memory figures) and is called through
``harness.inprocess.run_node`` (inference mode, as ComfyUI's executor), with a report hook
(``model_options[TUNING_REPORT_KEY]``) that returns the node's ``TuningReport``.

Time: up to three calls of the node per tuner: a warm-up call (``--warmup`` steps; default 1 on a GPU, where the
first call loads the models onto the device and initialises kernels, 0 on the CPU, where the first call's loop
measured no slower), call A with 1 step and call B with 1 + ``--steps`` steps. Two estimates of the seconds per
step, both without set-up: "step" = the median interval between the progress-bar updates of call B's steps
2..1+steps (each step ends with ``float(loss)``, which synchronises CUDA), and "B-A" = (B.seconds - A.seconds) /
steps, where ``seconds`` is the report's time of the tuning loop (ComfyUI's model loading and the loop's set-up are
in both calls and cancel out; the encodes before the loop are in neither). The first comes from one call, so it is
the one the projection uses; the second is exposed to load changes between calls (on a shared CPU they can differ
a lot: a note is printed when they differ by more than 25 %). "fixed" = call B's whole node time minus its
1 + steps steps: the per-run cost outside the steps (CLIP-vision/VAE/text encodes, loop set-up, writing the adapter
or LoRA). The projection for the nodes' defaults (300 identity + 300 subject-prior steps) is fixed + 300 x step,
per tuner, and is compared with Make-Your-3D's claim of about 5 minutes per subject on a GPU (the paper's figure is
end to end; the projection covers only the two tunings, not loading the models nor making the views).

Memory: on CUDA the report's peak of call B (``torch.cuda.max_memory_allocated``, reset when the tuning loop
starts, so the weights resident on the GPU are in it) and what was allocated just before call B. On the CPU the
process RSS sampled every 5 ms: RSS with the models loaded (before the first call), the peak during the calls and
the growth between them (activations, gradients, optimiser state, the encoders' working memory; the weights are
already resident); the report's own figure on the CPU is the process's lifetime ``ru_maxrss`` (loading included)
and is printed for reference.

    .venv/bin/python scripts/bench_make_your_3d.py --device cpu --steps 3
    .venv/bin/python scripts/bench_make_your_3d.py --device auto --steps 10 --out my3d.json   # on a GPU
    .venv/bin/python scripts/bench_make_your_3d.py --device cpu --only subject
"""
from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

#: SD1.5's UNet as ComfyUI's UNetModel arguments (8 heads, 768-wide context and convolution projections are added
#: where it is built). ComfyUI pops ``transformer_depth`` per input res-block from the front (2 per level; the
#: lowest level has none) and ``transformer_depth_output`` per output block from the end (the lowest level's three
#: output blocks come first and have none).
SD15_SHAPE = dict(model_channels=320, channel_mult=[1, 2, 4, 4], num_res_blocks=[2, 2, 2, 2],
                  transformer_depth=[1, 1, 1, 1, 1, 1, 0, 0], transformer_depth_middle=1,
                  transformer_depth_output=[1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0])
#: SD1.5's 16 cross-attention layers' query widths in diffusers' processor order (down, up, mid).
IP_LAYER_WIDTHS = [320, 320, 640, 640, 1280, 1280] + [1280] * 3 + [640] * 3 + [320] * 3 + [1280]
TUNERS = ("identity", "subject")
LABELS = {"identity": "identity (SD1.5 + IP-Adapter)", "subject": "subject prior (MVDream 4-view LoRA)"}
DEFAULT_STEPS = {"identity": 300, "subject": 300}  # the nodes' defaults
PAPER_MINUTES = 5.0  # Make-Your-3D: "within 5 minutes" per subject

NAMES = {"checkpoint": "bench_sd15_real_size.safetensors", "clip_vision": "bench_clip_vision_vitl.safetensors",
         "ipadapter": "bench_ip_adapter_sd15_vitl.safetensors", "mvdream": "bench_mvdream_sd15_4view.safetensors"}


# ------------------------------------------------------------------------------------------- model files

def sd15_unet_state_dict(seed: int, *, shape: dict = SD15_SHAPE):
    """The SD1.5 UNet (LDM key layout), seeded random float16."""
    from harness.tiny_models import sd15_ip_unet_state_dict

    return sd15_ip_unet_state_dict(seed, shape=shape)


def write_models(models: Path, which: tuple[str, ...]) -> None:
    """Write the model files the chosen tuners need into ``models/<folder>/``."""
    from safetensors.torch import save_file

    from harness.tiny_models import (SD15_CLIP_PREFIX, UNET_PREFIX, VAE_PREFIX, clip_vision_vitl_state_dict,
                                     ip_adapter_state_dict, mvdream_checkpoint_state_dict, prefixed,
                                     sd3_clip_l_state_dict, taesd_state_dict)

    for folder in ("checkpoints", "clip_vision", "ipadapter"):
        (models / folder).mkdir(parents=True, exist_ok=True)
    if "identity" in which:
        sd = prefixed(UNET_PREFIX, sd15_unet_state_dict(seed=1500))
        sd.update(prefixed(VAE_PREFIX, taesd_state_dict(4, seed=1504)))
        clip_l = sd3_clip_l_state_dict(seed=1768)
        sd.update(prefixed(SD15_CLIP_PREFIX, {k: v for k, v in clip_l.items() if k.startswith("text_model.")}))
        del clip_l
        save_file(sd, str(models / "checkpoints" / NAMES["checkpoint"]))
        del sd
        save_file(clip_vision_vitl_state_dict(seed=1400), str(models / "clip_vision" / NAMES["clip_vision"]))
        save_file(ip_adapter_state_dict(IP_LAYER_WIDTHS, embed_dim=768, cross_dim=768, tokens=4, seed=1507),
                  str(models / "ipadapter" / NAMES["ipadapter"]))
    if "subject" in which:
        sd = mvdream_checkpoint_state_dict("sd15", seed=1515, shape=SD15_SHAPE, text_width=768)
        save_file(sd, str(models / "checkpoints" / NAMES["mvdream"]))
        del sd


# ---------------------------------------------------------------------------------------- measuring tools

def rss_bytes() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


class RssPeak:
    """Peak process RSS while open, sampled every 5 ms (Linux)."""

    def __enter__(self):
        self.before = rss_bytes()
        self.peak = self.before
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)
        self._thread.start()
        return self

    def _watch(self):
        while not self._done.is_set():
            self.peak = max(self.peak, rss_bytes())
            time.sleep(0.005)

    def __exit__(self, *exc):
        self._done.set()
        self._thread.join()
        self.peak = max(self.peak, rss_bytes())
        return False


def gib(n: float) -> str:
    return f"{n / 2 ** 30:.2f} GiB"


# ------------------------------------------------------------------------------------ one tuner (a child)

def load_identity(names: dict):
    import torch

    import nodes as core
    from compose3d.nodes.ip_adapter import IPAdapterLoader
    from harness.inprocess import run_node

    with torch.inference_mode():
        model, clip, vae = core.CheckpointLoaderSimple().load_checkpoint(names["checkpoint"])[:3]
        clip_vision = core.CLIPVisionLoader().load_clip(names["clip_vision"])[0]
    adapter = run_node(IPAdapterLoader, ipadapter_name=names["ipadapter"]).result[0]
    return model, dict(ipadapter=adapter, clip_vision=clip_vision, vae=vae, clip=clip)


def load_subject(names: dict):
    from compose3d.nodes.mvdream import MVDreamLoader
    from harness.inprocess import run_node

    model, clip, vae = run_node(MVDreamLoader, ckpt_name=names["mvdream"]).result
    return model, dict(vae=vae, clip=clip)


def tuner_inputs(which: str, size: int, loaded: dict) -> tuple[type, dict]:
    import torch

    from compose3d.kernels.cameras import orbit_cameras
    from compose3d.nodes.make_your_3d import IdentityTuner, SubjectPriorTuner

    views = torch.rand(4, size, size, 3, generator=torch.Generator().manual_seed(7))
    if which == "identity":
        return IdentityTuner, dict(loaded, subject=views[:1], views=views, prompt="a photo of the subject",
                                   view_prompts="front view\nside view\nback view\nside view", learning_rate=1e-4,
                                   batch_size=4, augmentations=2, weight=1.0, seed=1,
                                   filename_prefix="bench_identity")
    return SubjectPriorTuner, dict(loaded, images=views, cameras=orbit_cameras(4), prompt="a 3D model of the subject",
                                   learning_rate=1e-4, rank=8, alpha=8.0, views_per_step=4, normal_weight=0.5,
                                   seed=2, filename_prefix="bench_subject")


def run_tuner(args) -> dict:
    """Load one tuner's models, run its three calls and return the figures (runs in a child process)."""
    from harness.inprocess import init_comfy, run_node, use_folders

    init_comfy(args.device)
    import torch

    import comfy.model_management
    import comfy.utils
    from compose3d.nodes.types import TUNING_REPORT_KEY

    which = args.child
    base = Path(args.models).parent
    use_folders(Path(args.models), base / "output", base / "temp", base / "input")
    device = comfy.model_management.get_torch_device()
    cuda = device.type == "cuda"
    started = time.perf_counter()
    model, loaded = (load_identity if which == "identity" else load_subject)(NAMES)
    load_seconds = time.perf_counter() - started
    reports: list = []
    clone = model.clone()
    clone.model_options[TUNING_REPORT_KEY] = reports.append
    node, inputs = tuner_inputs(which, args.size, loaded)
    inputs["model"] = clone
    figures = {"tuner": which, "device": str(device), "device_name": torch.cuda.get_device_name(device) if cuda else
               "cpu", "torch": torch.__version__, "threads": torch.get_num_threads(), "size": args.size,
               "timed_steps": args.steps, "warmup_steps": args.warmup, "load_seconds": load_seconds,
               "unet_dtype": str(model.model.get_dtype()).replace("torch.", ""),
               "manual_cast_dtype": str(model.model.manual_cast_dtype).replace("torch.", ""), "calls": {}}
    print(f"[{which}] models loaded in {load_seconds:.0f} s on {figures['device_name']} (UNet "
          f"{figures['unet_dtype']}, compute {figures['manual_cast_dtype']})", flush=True)
    rss_loaded = rss_bytes()
    calls = ([("warm-up", args.warmup)] if args.warmup > 0 else []) + [("A", 1), ("B", 1 + args.steps)]
    rss_peak = rss_loaded
    for label, steps in calls:
        stamps: list[float] = []
        comfy.utils.set_progress_bar_global_hook(
            lambda value, total, preview, node_id=None, steps=steps: stamps.append(time.perf_counter())
            if total == steps else None)
        allocated = torch.cuda.memory_allocated(device) if cuda else 0
        with RssPeak() as rss:
            t0 = time.perf_counter()
            run_node(node, steps=steps, **inputs)
            wall = time.perf_counter() - t0
        comfy.utils.set_progress_bar_global_hook(None)
        rss_peak = max(rss_peak, rss.peak)
        report = reports[-1]
        figures["calls"][label] = {"steps": report.steps, "wall_seconds": wall, "loop_seconds": report.seconds,
                                   "step_intervals": [b - a for a, b in zip(stamps, stamps[1:])],
                                   "peak_memory_bytes": report.peak_memory_bytes, "memory_kind": report.memory_kind,
                                   "rss_before": rss.before, "rss_peak": rss.peak,
                                   "gpu_allocated_before": allocated, "losses": report.losses}
        figures["trained_parameters"] = report.trained_parameters
        intervals = figures["calls"][label]["step_intervals"]
        print(f"[{which}] call {label}: {report.steps} steps, node {wall:.1f} s, loop {report.seconds:.1f} s"
              + (f", steps 2.. {', '.join(f'{t:.1f}' for t in intervals)} s" if intervals else "")
              + f"; losses {', '.join(f'{v:.4f}' for v in report.losses)}", flush=True)
    a, b = figures["calls"]["A"], figures["calls"]["B"]
    per_step = statistics.median(b["step_intervals"])
    figures["seconds_per_step"] = per_step
    figures["seconds_per_step_difference"] = (b["loop_seconds"] - a["loop_seconds"]) / args.steps
    figures["fixed_seconds"] = b["wall_seconds"] - (1 + args.steps) * per_step
    figures["projected_seconds"] = figures["fixed_seconds"] + DEFAULT_STEPS[which] * per_step
    if cuda:
        figures.update(peak_memory_bytes=b["peak_memory_bytes"], memory_kind="GPU max allocated",
                       gpu_allocated_before_bytes=b["gpu_allocated_before"])
    else:
        figures.update(rss_loaded=rss_loaded, rss_peak=rss_peak, peak_memory_bytes=rss_peak - rss_loaded,
                       memory_kind="RSS growth", ru_maxrss=b["peak_memory_bytes"])
    return figures


# ------------------------------------------------------------------------------------------------ parent

def child(args, which: str, models: Path) -> dict | None:
    out = models.parent / f"{which}.json"
    command = [sys.executable, __file__, "--child", which, "--models", str(models), "--device", args.device,
               "--size", str(args.size), "--steps", str(args.steps), "--warmup", str(args.warmup), "--out", str(out)]
    result = subprocess.run(command)
    if result.returncode != 0 or not out.exists():
        print(f"[{which}] FAILED (exit status {result.returncode})", flush=True)
        return None
    return json.loads(out.read_text())


def print_table(figures: dict, args) -> None:
    done = {k: v for k, v in figures["tuners"].items() if v}
    first = next(iter(done.values()), None)
    if first is None:
        print("no tuner finished")
        return
    print(f"\ndevice {first['device']} ({first['device_name']}), torch {first['torch']}, {first['threads']} CPU "
          f"threads; {args.size} px views ({args.size // 8}x{args.size // 8} latents), 4 views; "
          + (f"{args.warmup}-step warm-up call, then " if args.warmup else "no warm-up call, ")
          + f"1-step and {1 + args.steps}-step calls")
    head = (f"{'tuner':36s} {'UNet/compute':15s} {'trained':>9s} {'step s':>7s} {'B-A s':>7s} {'fixed s':>8s} "
            f"{'memory':>22s} {'300 steps':>10s}")
    print(head)
    print("-" * len(head))
    for which, f in done.items():
        dtype = f"{f['unet_dtype']}/{f['manual_cast_dtype'] if f['manual_cast_dtype'] != 'None' else '-'}"
        if f["memory_kind"] == "RSS growth":
            memory = f"+{f['peak_memory_bytes'] / 2 ** 30:.2f} GiB RSS"
        else:
            memory = f"{f['peak_memory_bytes'] / 2 ** 30:.2f} GiB GPU peak"
        print(f"{LABELS[which]:36s} {dtype:15s} {f['trained_parameters'] / 1e6:8.2f}M {f['seconds_per_step']:7.2f} "
              f"{f['seconds_per_step_difference']:7.2f} {f['fixed_seconds']:8.1f} {memory:>22s} "
              f"{f['projected_seconds'] / 60:8.1f} m")
    for which, f in done.items():
        if abs(f["seconds_per_step_difference"] - f["seconds_per_step"]) > 0.25 * f["seconds_per_step"]:
            print(f"  note: {which}: the two step estimates differ by more than 25 % (load changed between calls?)")
        if f["memory_kind"] == "RSS growth":
            print(f"  {which}: RSS {gib(f['rss_loaded'])} with the models loaded, peak {gib(f['rss_peak'])} during "
                  f"tuning; lifetime ru_maxrss {gib(f['ru_maxrss'])} (the report's CPU figure, loading included)")
        else:
            print(f"  {which}: peak allocated during call B's loop (reset at its start); "
                  f"{gib(f['gpu_allocated_before_bytes'])} was allocated before call B (weights kept on the GPU)")
    for which in TUNERS:
        if which in figures["tuners"] and not figures["tuners"][which]:
            print(f"{LABELS[which]:36s} FAILED")
    if len(done) == len(TUNERS):
        total = sum(f["projected_seconds"] for f in done.values())
        figures["projected_total_seconds"] = total
        figures["ratio_to_paper"] = total / (60 * PAPER_MINUTES)
        print(f"defaults ({DEFAULT_STEPS['identity']} identity + {DEFAULT_STEPS['subject']} subject-prior steps): "
              f"{total / 60:.1f} min = {figures['ratio_to_paper']:.2f} x Make-Your-3D's ~{PAPER_MINUTES:.0f} min per "
              f"subject (paper: end to end, on a GPU; here: the two tunings only, on {first['device_name']})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu", choices=("cpu", "auto"))
    parser.add_argument("--steps", type=int, default=3, help="timed steps: call B runs 1 + steps, call A 1")
    parser.add_argument("--warmup", type=int, help="steps of the warm-up call (0: none; default 1 on a GPU, 0 on the "
                                                   "CPU)")
    parser.add_argument("--size", type=int, help="view size in px (multiple of 8; default 512 on a GPU, 256 on "
                                                 "the CPU)")
    parser.add_argument("--only", choices=TUNERS, help="run one tuner")
    parser.add_argument("--out", help="also write the figures as JSON here")
    parser.add_argument("--keep", action="store_true", help="keep the temporary model folder (printed)")
    parser.add_argument("--child", choices=TUNERS, help=argparse.SUPPRESS)
    parser.add_argument("--models", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.steps < 1:
        parser.error("--steps must be at least 1")
    if args.child:
        Path(args.out).write_text(json.dumps(run_tuner(args)))
        return
    import torch

    cuda = args.device == "auto" and torch.cuda.is_available()
    if args.size is None:
        args.size = 512 if cuda else 256
    if args.warmup is None:
        args.warmup = 1 if cuda else 0
    if args.size % 8 or args.size < 64:
        parser.error("--size must be a multiple of 8, at least 64")
    which = (args.only,) if args.only else TUNERS
    started = time.perf_counter()
    base = Path(tempfile.mkdtemp(prefix="bench_make_your_3d_"))
    figures: dict = {"tuners": {}}
    try:
        from harness.inprocess import init_comfy

        init_comfy("cpu")  # this process only builds the files; each tuner runs in a child on --device
        t0 = time.perf_counter()
        write_models(base / "models", which)
        size = sum(p.stat().st_size for p in (base / "models").rglob("*") if p.is_file())
        print(f"model files written in {time.perf_counter() - t0:.0f} s ({gib(size)}) to {base / 'models'}",
              flush=True)
        for w in which:
            figures["tuners"][w] = child(args, w, base / "models")
        print_table(figures, args)
    finally:
        if args.keep:
            print(f"kept {base}")
        else:
            shutil.rmtree(base, ignore_errors=True)
    figures["seconds"] = time.perf_counter() - started
    print(f"benchmark took {figures['seconds']:.0f} s")
    if args.out:
        Path(args.out).write_text(json.dumps(figures, indent=2))
    if not all(figures["tuners"].values()):
        sys.exit(1)


if __name__ == "__main__":
    main()
