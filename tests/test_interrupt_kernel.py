"""Training and rendering in chunks: the same gradient as one whole batch, and a stop between chunks that leaves
the NeRF as it was after its last finished step."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from compose3d.kernels import renderer
from compose3d.kernels.nerf import NeRF
from compose3d.kernels.rays import camera_rays
from compose3d.kernels.reconstruct import FitSettings, fit_views
from harness.toy_scene import toy_nerf, toy_views

SIZE = 24
RAYS = 1000
SAMPLES = 32


class Stop(Exception):
    pass


@pytest.fixture(scope="module")
def scene():
    return toy_views(SIZE)


def new_nerf() -> NeRF:
    return toy_nerf(SAMPLES)


def whole_batch_gradients(nerf: NeRF, scene, settings: FitSettings) -> dict[str, torch.Tensor]:
    """The oracle: step 0's loss over all its rays at once (same rays and jitter as fit_views draws from its
    seeded generator), differentiated in one backward pass."""
    cameras, images, masks = scene
    gen = torch.Generator().manual_seed(settings.seed)
    origins, directions = camera_rays(cameras, SIZE, SIZE, device="cpu")
    origins, directions = origins.reshape(-1, 3), directions.reshape(-1, 3)
    pick = torch.randint(0, origins.shape[0], (settings.rays_per_step,), generator=gen)
    jitter = torch.rand(settings.rays_per_step, SAMPLES, generator=gen)
    m = masks.reshape(-1, 1)
    targets = images.reshape(-1, 3) * m + (1.0 - m)  # composited over white
    nerf.occupancy.carve(cameras.c2w, cameras.pixel_intrinsics(SIZE, SIZE), masks)
    nerf.field.train()
    out = renderer.render_rays(nerf.field, nerf.background, origins[pick], directions[pick], SAMPLES,
                               occupancy=nerf.occupancy, jitter=jitter)
    loss = F.mse_loss(out["features"], targets[pick]) + settings.mask_weight * F.mse_loss(out["opacity"], m[pick])
    loss.backward()
    return {n: p.grad.clone() for n, p in nerf.field.named_parameters() if p.grad is not None}


def test_a_step_rendered_in_chunks_has_the_whole_batch_gradient(scene, monkeypatch):
    cameras, images, masks = scene
    settings = FitSettings(steps=1, rays_per_step=RAYS, seed=5)
    oracle = whole_batch_gradients(new_nerf(), scene, settings)

    monkeypatch.setattr(renderer, "CHUNK_SAMPLES", 96 * SAMPLES)  # 96 rays a chunk: 11 chunks, the last short
    chunks = []
    nerf = new_nerf()
    fit_views(nerf, images, cameras, masks, settings, check_interrupt=lambda: chunks.append(1))
    assert len(chunks) == 11
    got = {n: p.grad for n, p in nerf.field.named_parameters() if p.grad is not None}
    assert sorted(got) == sorted(oracle)
    for name, grad in oracle.items():
        assert grad.abs().max() > 0, name
        torch.testing.assert_close(got[name], grad, rtol=1e-4, atol=1e-6 * float(grad.abs().max()), msg=name)


def test_without_chunking_the_gradient_is_the_oracles_bit_for_bit(scene):
    cameras, images, masks = scene
    settings = FitSettings(steps=1, rays_per_step=RAYS, seed=5)
    oracle = whole_batch_gradients(new_nerf(), scene, settings)
    nerf = new_nerf()
    fit_views(nerf, images, cameras, masks, settings)  # 1000 x 32 samples: one chunk
    for name, param in nerf.field.named_parameters():
        if name in oracle:
            assert torch.equal(param.grad, oracle[name]), name


def test_a_stop_between_chunks_leaves_the_nerf_at_its_last_finished_step(scene, monkeypatch):
    cameras, images, masks = scene
    nerf = new_nerf()
    fit_views(nerf, images, cameras, masks, FitSettings(steps=1, rays_per_step=RAYS, seed=5))
    before = {n: p.detach().clone() for n, p in nerf.field.named_parameters()}
    training_before = nerf.training

    monkeypatch.setattr(renderer, "CHUNK_SAMPLES", 96 * SAMPLES)
    calls = []

    def stop_at_the_fourth_chunk():
        calls.append(1)
        if len(calls) == 4:
            raise Stop

    with pytest.raises(Stop):
        fit_views(nerf, images, cameras, masks, FitSettings(steps=3, rays_per_step=RAYS, seed=5),
                  check_interrupt=stop_at_the_fourth_chunk)
    assert len(calls) == 4
    assert nerf.training is training_before and nerf.steps_trained == 1
    for name, param in nerf.field.named_parameters():
        assert torch.equal(param.detach(), before[name]), name


def test_rendering_chunks_are_bounded_by_samples_and_report_progress_per_chunk(scene, monkeypatch):
    cameras, _, _ = scene
    nerf = new_nerf()
    monkeypatch.setattr(renderer, "CHUNK_SAMPLES", 1000)
    reported = []
    settings = renderer.RenderSettings(samples_per_ray=100, chunk_rays=8192)
    out = renderer.render_views(nerf.field, nerf.background, cameras[:1], 8, 8, settings, with_normals=False,
                                on_progress=lambda done, total: reported.append((done, total)))
    assert reported == [(min(10 * i, 64), 64) for i in range(1, 8)]  # 10 rays a chunk: 1000 samples
    monkeypatch.setattr(renderer, "CHUNK_SAMPLES", 1 << 30)
    whole = renderer.render_views(nerf.field, nerf.background, cameras[:1], 8, 8, settings, with_normals=False)
    torch.testing.assert_close(out["features"], whole["features"])
    monkeypatch.undo()
    assert renderer.rays_per_chunk(64, 8192) == 1024  # 2^16 samples
    assert renderer.rays_per_chunk(1 << 17, 8192) == 1 and renderer.rays_per_chunk(1, 16) == 16
