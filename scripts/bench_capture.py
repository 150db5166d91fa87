"""Benchmark: cost of the SD3 attention capture hook (Compose3D_SD3AttentionCapture) on SD3-medium-sized blocks.
Prints times, their ratios and memory measured in this one run (not a test; nothing fails on a slow machine, but
a hooked output that differs from the plain one is an error).

Usage: python scripts/bench_capture.py [--device cpu|cuda] [--depth N] [--resolution PX] [--views V]
                                       [--repeats N] [--warmup N] [--block B] [--columns 5,6,7] [--cfg]

The model is ComfyUI's own MMDiT (comfy.ldm.modules.diffusionmodules.mmdit) with SD3-medium's shape and seeded
random weights: hidden size 1536 (= 64 x 24), 24 heads of 64, patch 2, 16 latent channels, pooled vector 2048,
context_embedder Linear(4096, 1536), pos_embed_max_size 192. ``--depth`` is the number of joint blocks built
(MMDiT's ``num_blocks``; the width stays SD3-medium's and the last block is the pre-only one, as in SD3): 24 by
default on CUDA (all of SD3-medium), 4 on the CPU. The inputs are what SD3 gets at ``--resolution`` px: latents
(V, 16, px/8, px/8), the joint text context (V, 154, 4096) = 77 CLIP + 77 T5 tokens, the pooled vector (V, 2048),
sigma 0.3 (timestep 300, inside the default capture window 100..450).

Three variants run the same forward (torch.inference_mode, the model called directly as ComfyUI's model wrapper
calls it):

  plain        no patch
  probability  patch_mmdit_attention on one block (default 11, or the last one built if fewer) with
               AttentionRecorder(normalization "probability").handle: the model's own attention, plus exact
               softmax probabilities of the kept text columns, chunked over image queries, into the accumulator
  official     the same with normalization "official" (raw q.k scores of the kept columns)

After --warmup untimed runs of each, --repeats timed runs go round the variants (the order rotates each round);
the median is reported. CUDA is synchronised around each run; its memory is torch.cuda.max_memory_allocated
(reset before each run) minus what was allocated when the run started, so the weights, the inputs and the
recorders' accumulators (allocated once, before any run) are not in it. On the CPU no memory is measured (process
RSS is too coarse for a few MiB); the accumulator's size is printed instead, next to its analytic size
views x image tokens x kept tokens x 4 bytes. Every hooked output must equal the plain output bit for bit (the
hook runs the model's own attention through ``call.default()``); every hooked run must have recorded.

    .venv/bin/python scripts/bench_capture.py --device cpu --depth 2 --resolution 512 --views 1 --repeats 2
    .venv/bin/python scripts/bench_capture.py --device cuda               # SD3-medium at 1024 px, 4 views
"""
from __future__ import annotations

import argparse
import dataclasses
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root, for the harness package
from harness.inprocess import init_comfy  # noqa: E402

#: SD3-medium: MMDiT depth 24 -> hidden 64 x 24 = 1536, 24 heads of 64 (ComfyUI ties both to ``depth``).
SD3_MEDIUM_DEPTH = 24
LATENT_CHANNELS = 16
POOLED_WIDTH = 2048
CONTEXT_WIDTH = 4096
TEXT_TOKENS = 77 + 77  # CLIP-L/G (77) and T5 (77) tokens, joined along the sequence
POS_EMBED_MAX_SIZE = 192
PATCH = 2
LATENT_SCALE = 8  # SD3's VAE: latents are 1/8 of the image
SIGMA = 0.3
DEFAULT_BLOCK = 11  # DreamBeast reads block 11
DEFAULT_COLUMNS = "5,6,7,20,21,22"  # text-token positions in the CLIP part of the context (two 3-token phrases)
VARIANTS = ("plain", "probability", "official")
TARGET_RATIO = 1.10
SEED = 3


def timestep(sigma):
    """SD3's ModelSamplingDiscreteFlow.timestep: sigma x 1000."""
    return sigma * 1000.0


# ------------------------------------------------------------------------------------------------ model

def build_mmdit(blocks: int, dtype, device: str, seed: int = SEED):
    """ComfyUI's MMDiT at SD3-medium's width with ``blocks`` joint blocks, filled with seeded random weights.

    Matrices: N(0, 1 / fan_in); vectors (biases; SD3-medium has no norm scales) and the position table: N(0, 0.02^2).
    """
    import torch

    import comfy.ops
    from comfy.ldm.modules.diffusionmodules.mmdit import MMDiT

    hidden = 64 * SD3_MEDIUM_DEPTH
    mmdit = MMDiT(input_size=None, patch_size=PATCH, in_channels=LATENT_CHANNELS, out_channels=LATENT_CHANNELS,
                  depth=SD3_MEDIUM_DEPTH, num_blocks=blocks, adm_in_channels=POOLED_WIDTH,
                  context_embedder_config={"target": "torch.nn.Linear",
                                           "params": {"in_features": CONTEXT_WIDTH, "out_features": hidden}},
                  pos_embed_max_size=POS_EMBED_MAX_SIZE, num_patches=POS_EMBED_MAX_SIZE ** 2,
                  dtype=dtype, device=device, operations=comfy.ops.disable_weight_init)
    generator = torch.Generator(device=device).manual_seed(seed)
    tensors = dict(mmdit.named_parameters())
    tensors.update(mmdit.named_buffers())
    with torch.no_grad():
        for name in sorted(tensors):
            t = tensors[name]
            std = t[0].numel() ** -0.5 if t.ndim >= 2 and name != "pos_embed" else 0.02
            t.normal_(0.0, std, generator=generator)
    return mmdit.eval()


def make_inputs(views: int, resolution: int, cfg: bool, dtype, device: str, seed: int = SEED + 1):
    """x (B, 16, px/8, px/8), t (B,), context (B, 154, 4096), y (B, 2048); B = views (2 x views with --cfg)."""
    import torch

    generator = torch.Generator(device=device).manual_seed(seed)
    batch = views * (2 if cfg else 1)
    side = resolution // LATENT_SCALE

    def randn(*shape):
        return torch.randn(shape, generator=generator, device=device, dtype=torch.float32).to(dtype)

    x = randn(batch, LATENT_CHANNELS, side, side)
    t = torch.full((batch,), timestep(SIGMA), device=device)
    return x, t, randn(batch, TEXT_TOKENS, CONTEXT_WIDTH), randn(batch, POOLED_WIDTH)


# ------------------------------------------------------------------------------------------------ measuring

class Runner:
    """One forward of the model with given transformer_options, timed (and its CUDA memory measured)."""

    def __init__(self, mmdit, inputs, cuda: bool):
        self.mmdit, self.inputs, self.cuda = mmdit, inputs, cuda

    def __call__(self, options: dict):
        import torch

        x, t, context, y = self.inputs
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            allocated = torch.cuda.memory_allocated()
        cpu, start = time.process_time(), time.perf_counter()
        with torch.inference_mode():
            out = self.mmdit(x, t, context=context, y=y, transformer_options=dict(options))
        if self.cuda:
            torch.cuda.synchronize()
        wall = time.perf_counter() - start
        cpu = time.process_time() - cpu
        peak = torch.cuda.max_memory_allocated() - allocated if self.cuda else None
        return out, wall, cpu, peak


def split_timing(handler, cuda: bool, totals: dict):
    """``handler`` wrapped to add, per call, the time of the whole call and of its ``call.default()`` (the model's
    own attention) to ``totals`` ("hook", "attention", "calls"); synchronises CUDA around both, so it is only for
    runs that are not the timed ones."""
    import torch

    def now():
        if cuda:
            torch.cuda.synchronize()
        return time.perf_counter()

    def handle(call):
        def default():
            start = now()
            out = call.default()
            totals["attention"] += now() - start
            return out

        start = now()
        out = handler(dataclasses.replace(call, default=default))
        totals["hook"] += now() - start
        totals["calls"] += 1
        return out

    return handle


def parse_columns(text: str) -> list[int]:
    try:
        columns = sorted({int(c) for c in text.replace(" ", "").split(",") if c != ""})
    except ValueError:
        raise SystemExit(f"--columns: {text!r} is not a comma-separated list of token positions") from None
    if not columns or columns[0] < 0 or columns[-1] >= TEXT_TOKENS:
        raise SystemExit(f"--columns: give token positions in 0..{TEXT_TOKENS - 1}, got {text!r}")
    return columns


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=("cpu", "cuda"),
                        help="where to run (default cuda when available, else cpu)")
    parser.add_argument("--depth", type=int,
                        help=f"joint blocks to build, 1..{SD3_MEDIUM_DEPTH}, at SD3-medium's width (hidden 1536, 24 "
                             f"heads); default {SD3_MEDIUM_DEPTH} (all of SD3-medium) on cuda, 4 on cpu")
    parser.add_argument("--resolution", type=int, default=1024,
                        help="image side in pixels, default 1024 (a multiple of 16; latents are px/8, image tokens "
                             "(px/16)^2)")
    parser.add_argument("--views", type=int, help="views in the batch (default 4 on cuda, 1 on cpu)")
    parser.add_argument("--repeats", type=int, help="timed runs per variant (default 10 on cuda, 2 on cpu)")
    parser.add_argument("--warmup", type=int, help="untimed runs per variant first (default 3 on cuda, 1 on cpu)")
    parser.add_argument("--block", type=int,
                        help=f"joint block to capture (default {DEFAULT_BLOCK}, or the last block built if fewer)")
    parser.add_argument("--columns", default=DEFAULT_COLUMNS,
                        help=f"text-token positions to record (the kept tokens), each in 0..{TEXT_TOKENS - 1}; default "
                             f"{DEFAULT_COLUMNS}")
    parser.add_argument("--cfg", action="store_true",
                        help="batch conditional and unconditional halves as a CFG step does (2 x views, "
                             "cond_or_uncond [0, 1]; only the conditional half is captured)")
    parser.add_argument("--dtype", choices=("float16", "bfloat16", "float32"),
                        help="weights and activations (default float16 on cuda, float32 on cpu)")
    args = parser.parse_args()
    if args.device is None:
        import torch

        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    cuda = args.device == "cuda"
    args.depth = args.depth or (SD3_MEDIUM_DEPTH if cuda else 4)
    args.views = args.views or (4 if cuda else 1)
    args.repeats = args.repeats or (10 if cuda else 2)
    args.warmup = args.warmup if args.warmup is not None else (3 if cuda else 1)
    args.dtype = args.dtype or ("float16" if cuda else "float32")
    if not 1 <= args.depth <= SD3_MEDIUM_DEPTH:
        parser.error(f"--depth: 1..{SD3_MEDIUM_DEPTH} joint blocks, got {args.depth}")
    if args.resolution % (LATENT_SCALE * PATCH) or not 0 < args.resolution // 16 <= POS_EMBED_MAX_SIZE:
        parser.error(f"--resolution: a multiple of 16 up to {16 * POS_EMBED_MAX_SIZE}, got {args.resolution}")
    if args.views < 1 or args.repeats < 1 or args.warmup < 0:
        parser.error("--views and --repeats: at least 1; --warmup: at least 0")
    block = args.block if args.block is not None else min(DEFAULT_BLOCK, args.depth - 1)
    if not 0 <= block < args.depth:
        parser.error(f"--block: 0..{args.depth - 1} (the blocks built), got {block}")
    columns = parse_columns(args.columns)

    init_comfy("cpu" if not cuda else "auto")
    import torch

    if cuda and not torch.cuda.is_available():
        sys.exit("--device cuda: torch sees no CUDA device")
    from compose3d.kernels.attention import CHUNK_LOGITS
    from compose3d.nodes.attention_patch import patch_mmdit_attention
    from compose3d.nodes.sd3_capture import AttentionRecorder, CaptureSettings

    dtype = getattr(torch, args.dtype)
    device = torch.device(args.device)
    started = time.perf_counter()
    mmdit = build_mmdit(args.depth, dtype, args.device)
    parameters = sum(p.numel() for p in mmdit.parameters())
    inputs = make_inputs(args.views, args.resolution, args.cfg, dtype, args.device)
    batch = inputs[0].shape[0]
    image_tokens = (args.resolution // (LATENT_SCALE * PATCH)) ** 2
    print(f"device: {torch.cuda.get_device_name() if cuda else 'cpu'} ({torch.get_num_threads()} CPU threads), "
          f"torch {torch.__version__}, {args.dtype}")
    print(f"model: ComfyUI MMDiT at SD3-medium width (hidden {mmdit.hidden_size}, {mmdit.num_heads} heads), "
          f"{args.depth} of {SD3_MEDIUM_DEPTH} joint blocks, {parameters / 1e6:.0f} M parameters, random weights; "
          f"built in {time.perf_counter() - started:.1f} s")
    print(f"input: {args.views} view(s){' x 2 (cfg)' if args.cfg else ''} at {args.resolution}x{args.resolution} "
          f"px: {image_tokens} image + {TEXT_TOKENS} text tokens; sigma {SIGMA} (t = {timestep(SIGMA):g}); "
          f"capture block {block}, {len(columns)} kept text tokens {columns}")

    sigmas = torch.full((batch,), SIGMA, device=device)
    cond_or_uncond = [0, 1] if args.cfg else [0]
    options = {"plain": {"sigmas": sigmas, "cond_or_uncond": cond_or_uncond}}
    recorders, split_options = {}, {}
    splits = {m: {"hook": 0.0, "attention": 0.0, "calls": 0} for m in VARIANTS[1:]}
    for mode in VARIANTS[1:]:
        settings = CaptureSettings(blocks=(block,), normalization=mode)
        assert settings.records(timestep(SIGMA)), "sigma outside the capture window"
        recorder = AttentionRecorder(settings, columns, args.views, image_tokens, timestep, device)
        recorder.view_index = torch.arange(args.views, dtype=torch.long)
        patched = patch_mmdit_attention({}, [block], recorder.handle)
        options[mode] = {**patched["transformer_options"], "sigmas": sigmas, "cond_or_uncond": cond_or_uncond}
        recorders[mode] = recorder
        patched = patch_mmdit_attention({}, [block], split_timing(recorder.handle, cuda, splits[mode]))
        split_options[mode] = {**patched["transformer_options"], "sigmas": sigmas, "cond_or_uncond": cond_or_uncond}

    run = Runner(mmdit, inputs, cuda)
    reference, *_ = run(options["plain"])
    if not torch.isfinite(reference).all():
        sys.exit("the plain output is not finite: the random weights overflow in this dtype; try --dtype float32")
    repeat, *_ = run(options["plain"])
    plain_repeatable = torch.equal(repeat, reference)
    del repeat
    runs = {v: 0 for v in VARIANTS}
    identical = {v: True for v in VARIANTS}

    def measure(variant: str, split: bool = False):
        out, wall, cpu, peak = run((split_options if split else options)[variant])
        identical[variant] = identical[variant] and torch.equal(out, reference)
        runs[variant] += 1
        return wall, cpu, peak

    for variant in VARIANTS:
        for _ in range(args.warmup):
            measure(variant)
    timed = {v: [] for v in VARIANTS}
    for r in range(args.repeats):
        order = VARIANTS[r % len(VARIANTS):] + VARIANTS[:r % len(VARIANTS)]
        for variant in order:
            timed[variant].append(measure(variant))
    split_runs = min(args.repeats, 3)
    for mode in VARIANTS[1:]:  # not timed: the capture's own work, timed inside the hook
        for _ in range(split_runs):
            measure(mode, split=True)

    # ------------------------------------------------------------------------------------------------ report
    walls = {v: statistics.median(w for w, _, _ in timed[v]) for v in VARIANTS}
    best = {v: min(w for w, _, _ in timed[v]) for v in VARIANTS}
    cpu_per_wall = {v: sum(c for _, c, _ in timed[v]) / sum(w for w, _, _ in timed[v]) for v in VARIANTS}
    peaks = {v: max(p for _, _, p in timed[v]) if cuda else None for v in VARIANTS}
    print(f"\n{args.warmup} warm-up + {args.repeats} timed run(s) per variant, round robin; times in ms")
    header = f"{'variant':12} {'median':>10} {'fastest':>10} {'x plain':>8} {'cpu/wall':>9}"
    if cuda:
        header += f" {'peak MiB':>9} {'extra MiB':>10}"
    print(header + f" {'= plain':>8} {'recorded':>9}")
    for v in VARIANTS:
        line = (f"{v:12} {1000 * walls[v]:10.1f} {1000 * best[v]:10.1f} {walls[v] / walls['plain']:8.3f} "
                f"{cpu_per_wall[v]:9.2f}")
        if cuda:
            line += f" {peaks[v] / 2 ** 20:9.1f} {(peaks[v] - peaks['plain']) / 2 ** 20:10.1f}"
        calls = f"{recorders[v].calls}/{runs[v]}" if v in recorders else "-"
        print(line + f" {'yes' if identical[v] else 'NO':>8} {calls:>9}")
    print("median = median wall time of the timed runs, x plain = ratio of the medians; cpu/wall = process CPU "
          "seconds per wall second; = plain: every output bit-identical to the plain one; recorded: capture calls "
          "/ forwards")
    if cuda:
        print("memory: peak = torch.cuda.max_memory_allocated during a run minus what was allocated when it started "
              "(weights, inputs and accumulators excluded); extra = that minus plain's")
    else:
        threads = torch.get_num_threads()
        low = [v for v in VARIANTS if cpu_per_wall[v] < 0.8 * threads]
        if low or max(cpu_per_wall.values()) / max(min(cpu_per_wall.values()), 1e-9) > 1.25:
            print(f"WARNING: cpu/wall differs between variants or is below the {threads} threads"
                  f"{' for ' + ', '.join(low) if low else ''}: other processes took CPU time during this run, so "
                  f"the times and ratios are unreliable; rerun on an idle machine or with more --repeats")

    kept = len(columns)
    analytic = args.views * image_tokens * kept * 4
    for mode, recorder in recorders.items():
        acc = recorder.accumulator
        actual = acc.sums.numel() * acc.sums.element_size() + acc.counts.numel() * acc.counts.element_size()
        finite = bool(torch.isfinite(acc.sums).all())
        print(f"accumulator ({mode}): {tuple(acc.sums.shape)} {acc.sums.dtype}, {actual / 2 ** 20:.3f} MiB on "
              f"{acc.sums.device} (analytic views x image tokens x kept tokens x 4 B = {args.views} x {image_tokens} "
              f"x {kept} x 4 = {analytic / 2 ** 20:.3f} MiB); finite: {finite}; mean value "
              f"{float(acc.mean().mean()):.4g}")
    per_chunk = CHUNK_LOGITS * 4
    copies = args.views * (image_tokens + (image_tokens + TEXT_TOKENS)) * mmdit.hidden_size * 4
    print(f"capture transients (analytic): float32 copies of q (image rows) and k {copies / 2 ** 20:.1f} MiB + "
          f"chunks of at most {CHUNK_LOGITS} logits ({per_chunk / 2 ** 20:.0f} MiB each, a few alive at once)")

    for mode in VARIANTS[1:]:
        ratio = walls[mode] / walls["plain"]
        added = walls[mode] - walls["plain"]
        line = (f"{mode}: hooked / plain time {ratio:.3f} (target <= {TARGET_RATIO:.2f}: "
                f"{'met' if ratio <= TARGET_RATIO else 'NOT met'}); {1000 * added:+.1f} ms per forward for one "
                f"captured block of {args.depth}")
        if cuda:
            line += f"; extra peak memory {(peaks[mode] - peaks['plain']) / 2 ** 20:.1f} MiB"
        print(line)
    for mode, split in splits.items():
        calls = max(split["calls"], 1)
        work = (split["hook"] - split["attention"]) / calls
        print(f"{mode}: inside the hook ({split_runs} more untimed runs, timed per call"
              f"{', CUDA synchronised' if cuda else ''}): capture work {1000 * work:.1f} ms per call next to the "
              f"block's own attention {1000 * split['attention'] / calls:.1f} ms; capture work / plain forward = "
              f"{work / walls['plain']:.3f} (estimated ratio {1 + work / walls['plain']:.3f})")
    if args.depth < SD3_MEDIUM_DEPTH:
        full = walls["plain"] * SD3_MEDIUM_DEPTH / args.depth
        estimates = []
        for m, split in splits.items():
            work = (split["hook"] - split["attention"]) / max(split["calls"], 1)
            estimates.append(f"{m} {1 + (walls[m] - walls['plain']) / full:.3f} from the medians, "
                             f"{1 + work / full:.3f} from the work inside the hook")
        print(f"note: {args.depth} of {SD3_MEDIUM_DEPTH} blocks built, so the plain forward is about "
              f"{args.depth}/{SD3_MEDIUM_DEPTH} of SD3-medium's; over a full forward (blocks scaled, embedders "
              f"ignored) one captured block would give a ratio of about " + "; ".join(estimates))

    print(f"plain output repeatable: {plain_repeatable}; hooked outputs bit-identical to plain: "
          + ", ".join(f"{m} {identical[m]}" for m in recorders))
    if not plain_repeatable:
        sys.exit("the plain forward is not deterministic here, so bit-identity cannot be checked")
    assert all(identical[m] for m in recorders), "a hooked output differs from the plain output"
    assert all(r.calls == runs[m] * 1 for m, r in recorders.items()), \
        f"not every hooked forward recorded: {[(m, r.calls, runs[m]) for m, r in recorders.items()]}"


if __name__ == "__main__":
    main()
