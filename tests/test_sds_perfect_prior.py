"""End to end with a perfect prior: SDS from an empty field must make the toy object, and a wrong camera
convention must not.

The MODEL is MVDream's, loaded by the pack's loader, with its UNet replaced by the optimal denoiser for the toy
object (:mod:`harness.perfect_prior`): for each sample it renders the object exactly at the camera decoded from the
sample's MVDream camera vector (at a fixed distance and fov, which the vector does not hold), encodes it with the
same VAE and returns the eps that denoises to it. Everything else is the real node: camera sampling, rendering,
encoding with gradients, noise, ComfyUI's prediction path, the x0-reconstruction loss, the optimiser. So passing
thresholds that the mirrored-azimuth variant fails shows that cameras, renderer, encoding, loss sign and scale
agree. Oracles: exact renders of the toy object and its exact surface.
"""
from __future__ import annotations

import math
import time

import numpy as np
import pytest
import torch
import trimesh

from compose3d.kernels.cameras import orbit_cameras
from compose3d.kernels.metrics import chamfer_distance, psnr
from compose3d.kernels.toy_object import render_toy_object, sample_surface
from compose3d.nodes.mesh import ExportMesh
from compose3d.nodes.nerf import RenderNeRF
from compose3d.nodes.sds import SDSOptimizer
from harness.inprocess import run_node
from harness.perfect_prior import load_perfect_prior, write_perfect_prior_checkpoint

DISTANCE, FOV = 2.5, 40.0  # the perfect prior's fixed camera; SDS draws its cameras at the same ones
SIZE = 48  # px per render: 6x6 latents
STEPS = 160
MIN_PSNR = 17.5  # dB on held-out views (measured: 19.2 official, 16.1 mirrored azimuth)
MAX_CHAMFER = 0.095  # scene units, the object is about 1.2 units tall (measured: 0.081 official, 0.113 mirrored)
#: Mesh density level. After this short run the density is still soft: inside the object its 10th percentile was
#: 3.0 (median 4.9), outside its 99th percentile 2.1.
THRESHOLD = 2.5

SETTINGS = dict(seed=0, steps=STEPS, guidance_scale=7.5, loss="x0_reconstruction", std_rescale=0.5, t_start=0.98,
                t_min_end=0.02, t_max_end=0.5, anneal_fraction=0.8, low_resolution=SIZE, low_batch=4,
                high_resolution=SIZE, high_batch=4, high_from=1.0, elevation_min=-10.0, elevation_max=40.0,
                fov_min=FOV, fov_max=FOV, distance_min=DISTANCE * math.tan(math.radians(FOV / 2)),
                distance_max=DISTANCE * math.tan(math.radians(FOV / 2)), learning_rate=0.01,
                orientation_weight=0.0, sparsity_weight=0.0, opaque_weight=0.0, background="white",
                samples_per_ray=32, checkpoint_every=0, checkpoint_prefix="perfect/run", resume_from="",
                reference_fit=0.2, reference_weight_start=1000.0, reference_weight_end=100.0, warm_start_max_t=0.5,
                start_at_step=0, end_at_step=100000, prompt="", parts="", cross_strength=0.6, self_strength=1.2,
                modulation_start=0.4314, modulation_end=1.0)


def distil_and_measure(folder, output_dir, convention: str) -> dict:
    path = write_perfect_prior_checkpoint(folder / "perfect_prior.safetensors")
    model, vae = load_perfect_prior(path, DISTANCE, FOV, convention)
    cond = [[torch.zeros(1, 77, 64), {}]]  # the perfect prior ignores the text
    started = time.monotonic()
    nerf, _, report = run_node(SDSOptimizer, model=model, vae=vae, positive=cond, negative=cond,
                               **SETTINGS).result
    seconds = time.monotonic() - started
    held_out = orbit_cameras(6, 20.0, 15.0, 360, DISTANCE, FOV)  # azimuths no step drew exactly
    truth, _, _ = render_toy_object(held_out, 64, 64)
    rgb, _, _, _ = run_node(RenderNeRF, nerf=nerf, cameras=held_out, width=64, height=64,
                            samples_per_ray=0).result
    mesh_path, _ = run_node(ExportMesh, nerf=nerf, filename_prefix=f"perfect/{convention}", format="glb",
                            resolution=96, threshold=THRESHOLD, keep_components=1, max_faces=50000, colors="vertex",
                            texture_size=1024).result
    mesh = trimesh.load(output_dir / mesh_path, force="mesh")
    points = np.asarray(trimesh.sample.sample_surface(mesh, 20000, seed=0)[0])
    return {"psnr": psnr(rgb, truth), "chamfer": chamfer_distance(points, sample_surface(20000)),
            "seconds": seconds, "report": report}


@pytest.fixture(scope="module")
def official(comfy_inprocess, tmp_path_factory):
    return distil_and_measure(tmp_path_factory.mktemp("prior"), comfy_inprocess / "output", "official")


@pytest.fixture(scope="module")
def mirrored(comfy_inprocess, tmp_path_factory):
    return distil_and_measure(tmp_path_factory.mktemp("prior"), comfy_inprocess / "output", "mirrored_azimuth")


def test_sds_with_a_perfect_prior_makes_the_object(official):
    print(f"\nperfect prior, official cameras: psnr {official['psnr']:.2f} dB, chamfer {official['chamfer']:.4f}, "
          f"{official['seconds']:.0f} s\n{official['report']}")
    assert official["psnr"] >= MIN_PSNR
    assert official["chamfer"] <= MAX_CHAMFER


def test_a_mirrored_azimuth_convention_fails_the_thresholds(mirrored):
    print(f"\nperfect prior, mirrored azimuth: psnr {mirrored['psnr']:.2f} dB, chamfer {mirrored['chamfer']:.4f}")
    assert mirrored["psnr"] < MIN_PSNR or mirrored["chamfer"] > MAX_CHAMFER
