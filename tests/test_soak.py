"""Soak: hundreds of small prompts, good and bad mixed, through one real ComfyUI server.

A seeded mix of camera previews, reconstructions with mesh export or renders, MVDream model loads and sampling
(alternating two checkpoints so the model really loads again), bad prompts (refused by ComfyUI or failing in the
node with a named input) and interrupted long trainings. Checked: no good prompt fails and each bad or interrupted
one is followed by working prompts; the server's memory settles (the RSS baseline's growth per 100 prompts over the
second half of the run); the output folder holds exactly the files the good prompts reported, the temp folder exactly their
preview images, and the server's private system temp folder nothing. The RSS series and counts are also written to
``soak-report.json`` beside the server's folders.

CI runs a short soak (``--soak-prompts``, default in conftest.py); ``bash scripts/test.sh -m soak --soak-prompts
2000`` runs a long one. The figures are printed at the end of the pytest run.
"""
from __future__ import annotations

import json
import random
import statistics
import time
from collections import Counter
from pathlib import Path

import psutil
import pytest
from safetensors.torch import save_file

from comfy_execution.graph_utils import GraphBuilder
from harness.interrupt import interrupt_at_first_progress
from harness.paths import PACK_ROOT, comfyui_root, python_for_server
from harness.report import add_summary_line
from harness.tiny_models import mvdream_checkpoint_state_dict
from harness.server import ComfyServer, PromptRejected

pytestmark = [pytest.mark.server, pytest.mark.soak]

CHECKPOINTS = ("soak_mvdream_sd21.safetensors", "soak_mvdream_sd15.safetensors")
#: How often each kind of prompt comes (weights of a seeded random choice).
MIX = {"cameras": 30, "reconstruct": 20, "mvdream": 15, "bad": 30, "interrupt": 5}
#: Prompts per block of the baseline: the least RSS within a block drops the transient peaks (a model load, a big
#: render) that a single sample can catch.
BASELINE_BLOCK = 10
#: Baseline growth allowed over the second half of the run, per 100 prompts: the median rise of the baseline from
#: one block to the next. A leak raises it block after block; a one-off step of the allocator moves one block and
#: leaves the median alone. Measured with MALLOC_TUNABLES, 300 prompts on two CPU cores: clean runs +0.0 and +0.8
#: (least-squares trend of all samples, printed too: +6.5 and +11.4); a planted leak of 1 MiB per camera preview
#: (a third of the prompts) +23.4 (trend +35.3). Without MALLOC_TUNABLES the server's RSS jumped between plateaus
#: some 100 MiB apart: clean runs' trends ranged from -25 to +44 and the planted leak hid in the heap's free space
#: (baseline +0.8, trend +41).
MAX_GROWTH_MIB_PER_100 = 10.0


#: glibc malloc settings of the soak's server, so that its RSS follows the memory in use: blocks of 128 KiB and
#: more always come from mmap and go back on free (by default the threshold grows with the largest block freed, up
#: to 32 MiB, and a leak then fills the heap's free space before RSS moves), and free memory at the heap's top
#: goes back too.
MALLOC_TUNABLES = "glibc.malloc.mmap_threshold=131072:glibc.malloc.trim_threshold=131072"


@pytest.fixture(scope="module")
def soak_server(tmp_path_factory):
    """A fresh server (so its memory and folders are the soak's alone) with its own models and system temp."""
    root = tmp_path_factory.mktemp("soak")
    models = root / "models"
    (models / "checkpoints").mkdir(parents=True)
    for name, family in zip(CHECKPOINTS, ("sd21", "sd15")):
        save_file(mvdream_checkpoint_state_dict(family, seed=31), str(models / "checkpoints" / name))
    system_tmp = root / "system-tmp"
    system_tmp.mkdir()
    server = ComfyServer(comfyui=comfyui_root(), base=root / "base", models=models, pack_root=PACK_ROOT,
                         python=python_for_server(), env={"TMPDIR": str(system_tmp), "GLIBC_TUNABLES": MALLOC_TUNABLES})
    server.start()
    try:
        yield server, system_tmp
    finally:
        server.stop()


# ----------------------------------------------------------------------------------------------- prompts

def orbit(g: GraphBuilder, views: int, elevation: float):
    return g.node("Compose3D_OrbitCameras", views=views, elevation=elevation, azimuth_start=0.0,
                  azimuth_span=360.0, distance=2.5, fov=40.0)


def cameras_prompt(rng: random.Random, i: int):
    g = GraphBuilder(prefix="")
    views = rng.randint(1, 12)
    g.node("Compose3D_PreviewCameras", cameras=orbit(g, views, round(rng.uniform(-60, 60), 2)).out(0))
    return g.finalize()


def nerf_nodes(g: GraphBuilder, seed: int, steps: int, size: int = 16, camera_views: int = 4):
    cameras = orbit(g, 4, 20.0)
    views = g.node("Compose3D_TestObjectViews", cameras=cameras.out(0), width=size, height=size,
                   background="white")
    fit_cameras = cameras if camera_views == 4 else orbit(g, camera_views, 20.0)
    nerf = g.node("Compose3D_NeRFFromViews", images=views.out(0), cameras=fit_cameras.out(0), masks=views.out(1),
                  steps=steps, rays_per_step=256, samples_per_ray=16, learning_rate=0.01, background="white",
                  seed=seed)
    return cameras, nerf


def reconstruct_prompt(rng: random.Random, i: int):
    """A few NeRF steps, then a mesh file (threshold 0.01: a fresh field's density is about 1 inside the carved hull, 0 outside) or renders."""
    g = GraphBuilder(prefix="")
    cameras, nerf = nerf_nodes(g, seed=i, steps=rng.randint(2, 8))
    if rng.random() < 0.5:
        g.node("Compose3D_ExportMesh", nerf=nerf.out(0), filename_prefix=f"soak/mesh{i}",
               format=rng.choice(["glb", "obj", "ply"]), resolution=32, threshold=0.01, keep_components=1,
               max_faces=500, colors=rng.choice(["texture", "vertex", "none"]), texture_size=64)
    else:
        render = g.node("Compose3D_RenderNeRF", nerf=nerf.out(0), cameras=cameras.out(0), width=16, height=16,
                        samples_per_ray=16)
        g.node("PreviewImage", images=render.out(rng.choice([0, 1, 3])))
    return g.finalize()


def mvdream_prompt(rng: random.Random, i: int):
    """Load one of two MVDream checkpoints (alternating: a real load each time) and sample 4 views."""
    g = GraphBuilder(prefix="")
    loader = g.node("Compose3D_MVDreamLoader", ckpt_name=CHECKPOINTS[i % 2])
    cameras = orbit(g, 4, 15.0)
    conds = [g.node("Compose3D_MVDreamConditioning", cameras=cameras.out(0),
                    conditioning=g.node("CLIPTextEncode", text=text, clip=loader.out(1)).out(0))
             for text in (f"a toy number {i}", "")]
    latent = g.node("EmptyLatentImage", width=64, height=64, batch_size=4)
    sampler = g.node("KSampler", model=loader.out(0), seed=i, steps=rng.randint(1, 2), cfg=7.5,
                     sampler_name="ddim", scheduler="normal", positive=conds[0].out(0), negative=conds[1].out(0),
                     latent_image=latent.out(0), denoise=1.0)
    decoded = g.node("VAEDecode", samples=sampler.out(0), vae=loader.out(2))
    g.node("PreviewImage", images=decoded.out(0))
    return g.finalize()


def bad_prompt(rng: random.Random, i: int):
    """A prompt that must fail: refused by ComfyUI or stopped by the pack's validation (or a node's check)."""
    g = GraphBuilder(prefix="")
    kind = rng.choice(["nan", "combo", "range", "mismatch", "escape", "format"])
    if kind == "nan":
        rig = g.node("Compose3D_OrbitCameras", views=4, elevation=float("nan"), azimuth_start=0.0,
                     azimuth_span=360.0, distance=2.5, fov=40.0)
        g.node("Compose3D_PreviewCameras", cameras=rig.out(0))
    elif kind == "combo":
        views = g.node("Compose3D_TestObjectViews", cameras=orbit(g, 2, 10.0).out(0), width=16, height=16,
                       background="purple")
        g.node("PreviewImage", images=views.out(0))
    elif kind == "range":
        g.node("Compose3D_PreviewCameras", cameras=orbit(g, 0, 10.0).out(0))
    elif kind == "mismatch":
        _, nerf = nerf_nodes(g, seed=i, steps=2, camera_views=3)
        g.node("PreviewAny", source=nerf.out(0))
    else:
        _, nerf = nerf_nodes(g, seed=0, steps=2)
        g.node("Compose3D_ExportMesh", nerf=nerf.out(0),
               filename_prefix="../outside" if kind == "escape" else "soak/never",
               format="gltf" if kind == "format" else "glb", resolution=32, threshold=0.01, keep_components=1,
               max_faces=500, colors="none", texture_size=64)
    return g.finalize(), kind


# ------------------------------------------------------------------------------------------------- the soak

def rss_mib(pid: int) -> float:
    process = psutil.Process(pid)
    return sum(p.memory_info().rss for p in [process, *process.children(recursive=True)]) / 2 ** 20


def growth_per_100(samples: list[tuple[int, float]]) -> float:
    """Least-squares slope of RSS (MiB) over prompts, per 100 prompts: the trend of all samples, printed."""
    n = len(samples)
    mean_x = sum(x for x, _ in samples) / n
    mean_y = sum(y for _, y in samples) / n
    covariance = sum((x - mean_x) * (y - mean_y) for x, y in samples)
    variance = sum((x - mean_x) ** 2 for x, _ in samples)
    return 100.0 * covariance / variance


def baseline_growth_per_100(samples: list[tuple[int, float]], block: int = BASELINE_BLOCK) -> float:
    """Median rise of the RSS baseline (the least sample of each block of ``block`` prompts) from one block to the
    next, per 100 prompts: steady growth shows in most rises, a one-off step in one."""
    baseline = [min(y for _, y in samples[i:i + block]) for i in range(0, len(samples) - block + 1, block)]
    assert len(baseline) >= 3, "too few prompts for a baseline trend"
    return 100.0 / block * statistics.median(b - a for a, b in zip(baseline, baseline[1:]))


def files_under(folder: Path) -> set[str]:
    return {str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file()} if folder.exists() else set()


def reported_files(result, kind: str) -> set[str]:
    """Files a run's outputs name in the ``output`` or ``temp`` folder (images and 3D files)."""
    found = set()
    for shown in result.outputs.values():
        for entry in shown.get("images", []) + shown.get("3d", []):
            if entry.get("type") == kind:
                found.add(str(Path(entry.get("subfolder") or "") / entry["filename"]))
    return found


@pytest.mark.timeout(6 * 3600)
def test_soak_mixed_prompts_keep_working_with_settled_memory_and_no_stray_files(soak_server, request):
    server, system_tmp = soak_server
    total = request.config.getoption("--soak-prompts")
    assert total >= 20, "a soak needs at least 20 prompts"
    rng = random.Random(20261122)
    kinds = rng.choices(list(MIX), weights=list(MIX.values()), k=total)
    for first, kind in enumerate(("cameras", "reconstruct", "mvdream", "mvdream", "bad", "interrupt")):
        kinds[first] = kind  # every kind (and both checkpoints) early, before the memory baseline
    output, temp = server.base / "output", server.base / "temp"

    counts, failures = Counter(), []
    expected_output, expected_temp = set(), set()
    rss = [(0, rss_mib(server.proc.pid))]
    started = time.monotonic()
    for i, kind in enumerate(kinds):
        if kind == "bad":
            prompt, label = bad_prompt(rng, i)
            try:
                result = server.run(prompt, timeout=120)
                if result.status != "error":
                    failures.append(f"#{i} bad {label}: ended {result.status!r}")
                counts["bad failed in a node"] += 1
            except PromptRejected:
                counts["bad refused by ComfyUI"] += 1
        elif kind == "interrupt":
            g = GraphBuilder(prefix="")
            _, nerf = nerf_nodes(g, seed=i, steps=100000)
            g.node("PreviewAny", source=nerf.out(0))
            run = interrupt_at_first_progress(server, g.finalize(), nerf.id)
            if run.result.status != "interrupted" or run.stopped_after is None or run.stopped_after > 2.0:
                failures.append(f"#{i} interrupt: {run.result.status}, stopped after {run.stopped_after}")
            counts["interrupted"] += 1
        else:
            prompt = {"cameras": cameras_prompt, "reconstruct": reconstruct_prompt,
                      "mvdream": mvdream_prompt}[kind](rng, i)
            result = server.run(prompt, timeout=300)
            if result.status != "success":
                failures.append(f"#{i} {kind}: {result.status} {json.dumps(result.error)[:400]}")
            expected_output |= reported_files(result, "output")
            expected_temp |= reported_files(result, "temp")
            counts[f"good {kind}"] += 1
        rss.append((i + 1, rss_mib(server.proc.pid)))
    seconds = time.monotonic() - started

    assert server.alive()
    half = rss[len(rss) // 2]
    end = rss[-1]
    trend = growth_per_100(rss[len(rss) // 2:])
    growth = baseline_growth_per_100(rss[len(rss) // 2:])
    written = files_under(output)
    stray_output = sorted(f for f in written if not any(f == e or f.startswith(str(Path(e).with_suffix("")) + ".")
                                                         for e in expected_output))
    missing_output = sorted(expected_output - written)
    stray_temp = sorted(files_under(temp) - expected_temp)
    left_in_tmp = sorted(files_under(system_tmp))
    summary = (f"soak: {total} prompts in {seconds:.0f} s ({dict(sorted(counts.items()))}), failures "
               f"{len(failures)}; server RSS start {rss[1][1]:.0f} MiB (after prompt 1), at prompt {half[0]} "
               f"{half[1]:.0f} MiB, end {end[1]:.0f} MiB (max {max(r for _, r in rss):.0f}); growth over the second "
               f"half: baseline {growth:+.1f} MiB per 100 prompts (median block-to-block rise of the least RSS per "
               f"{BASELINE_BLOCK} prompts), least-squares trend {trend:+.1f}; output files {len(written)} (all reported: "
               f"{not stray_output and not missing_output}), temp files {len(files_under(temp))}, left in the "
               f"server's TMPDIR {len(left_in_tmp)}")
    add_summary_line(request.config, summary)
    report = {"prompts": total, "seconds": seconds, "counts": dict(counts), "failures": failures,
              "rss_mib": rss, "growth_mib_per_100": growth, "trend_mib_per_100": trend, "left_in_tmp": left_in_tmp}
    (server.base.parent / "soak-report.json").write_text(json.dumps(report, indent=1))
    assert failures == [], "\n".join(failures)
    assert counts["interrupted"] and counts["good mvdream"] >= 2 and counts["good reconstruct"]
    assert stray_output == [] and missing_output == [], (stray_output, missing_output)
    assert stray_temp == [], stray_temp
    assert left_in_tmp == [], left_in_tmp
    assert growth < MAX_GROWTH_MIB_PER_100, summary
