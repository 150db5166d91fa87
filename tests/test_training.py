"""The shared training loop (kernels/training.py): exact resume through a checkpoint file, all-or-nothing steps,
named parameter groups at their own learning rates, the occupancy schedule.

Oracles: an uninterrupted run of the same training (resume and stop must reproduce it bit for bit), the state
before a stopped step, and Adam's first step (each element moves by its group's learning rate).
"""
from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors import safe_open

from compose3d.kernels.nerf import NeRF
from compose3d.kernels.reconstruct import (FitSettings, PosedPixels, fit_views, nerf_param_groups,
                                           photometric_step)
from compose3d.kernels.training import (OccupancySchedule, OccupancyUpdates, ParamGroup, StepDone, TrainingState,
                                        load_optimizer_state, make_optimizer, read_checkpoint, set_learning_rates,
                                        train, write_checkpoint)
from harness.toy_scene import toy_nerf, toy_views

SIZE = 16
RAYS = 192
SAMPLES = 24
SCHEDULE = OccupancySchedule(interval=2, warmup=2)  # refreshes at steps 2 (all cells), 4, 6 (a quarter)


class Stop(Exception):
    pass


@pytest.fixture(scope="module")
def scene():
    return toy_views(SIZE)


def new_nerf(seed: int = 3) -> NeRF:
    return toy_nerf(SAMPLES, seed=seed, occupancy_resolution=16)


class Run:
    """A reconstruction trained through :func:`train` directly: NeRF, state, step function, occupancy."""

    def __init__(self, scene, nerf_seed: int = 3, rng_seed: int = 11):
        cameras, images, masks = scene
        self.nerf = new_nerf(nerf_seed)
        self.pixels = PosedPixels.of_views(images, cameras, masks, self.nerf.background.rgb)
        self.state = TrainingState(make_optimizer(nerf_param_groups(self.nerf, 0.01)),
                                   torch.Generator().manual_seed(rng_seed))
        self.occupancy = OccupancyUpdates(self.nerf.occupancy, self.nerf.field.density,
                                          self.nerf.occupancy_threshold(), SCHEDULE)

    def step_fn(self, step):
        return photometric_step(self.nerf, self.pixels, step, RAYS, 0.1, SCHEDULE.skips_empty(step.index))

    def train(self, steps: int, **kw):
        return train(self.state, self.step_fn, steps, occupancy=self.occupancy, **kw)

    def weights(self) -> dict[str, torch.Tensor]:
        return {**{"field." + k: v for k, v in self.nerf.field.state_dict().items()},
                **{"occupancy." + k: v for k, v in self.nerf.occupancy.state_dict().items()}}

    def load_weights(self, tensors: dict[str, torch.Tensor]) -> None:
        self.nerf.field.load_state_dict({k[6:]: v for k, v in tensors.items() if k.startswith("field.")})
        self.nerf.occupancy.load_state_dict({k[10:]: v for k, v in tensors.items() if k.startswith("occupancy.")})

    def snapshot(self) -> dict[str, torch.Tensor]:
        """Copies of everything a finished step defines: weights, grid, optimiser state, random stream."""
        tensors, _ = self.state.to_tensors()
        return {**{k: v.clone() for k, v in self.weights().items()}, **tensors}


def assert_same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert sorted(a) == sorted(b)
    differ = [k for k in a if not torch.equal(a[k], b[k])]
    assert not differ, f"differ: {differ}"


# ------------------------------------------------------------------------------------------------- resume

def test_resuming_from_a_checkpoint_file_continues_bit_for_bit(scene, tmp_path):
    whole = Run(scene)
    whole.train(8)

    first = Run(scene)
    first.train(4)
    tensors, meta = first.state.to_tensors()
    json.dumps(meta)  # JSON-able as promised
    path = tmp_path / "checkpoint.safetensors"
    write_checkpoint(path, {**{"nerf." + k: v for k, v in first.weights().items()}, **tensors}, meta)
    with safe_open(str(path), framework="pt") as f:  # a plain safetensors file: nothing pickled
        assert "rng" in f.keys() and "optimizer.0.exp_avg" in f.keys()

    # Fresh objects: another initialisation and another random stream, replaced by the file's.
    resumed = Run(scene, nerf_seed=99, rng_seed=12345)
    loaded, loaded_meta = read_checkpoint(path)
    resumed.load_weights({k[5:]: v for k, v in loaded.items() if k.startswith("nerf.")})
    resumed.state.load_tensors(loaded, loaded_meta)
    assert resumed.state.step == 4
    resumed.train(4)

    assert resumed.state.step == whole.state.step == 8
    assert_same(resumed.snapshot(), whole.snapshot())
    groups = resumed.state.optimizer.state_dict()["param_groups"]
    assert groups == whole.state.optimizer.state_dict()["param_groups"]  # betas come back as a tuple too


def test_without_the_saved_random_stream_the_resumed_run_differs(scene):
    """The comparison above is sensitive: a resume that reseeds its random stream ends elsewhere."""
    whole = Run(scene)
    whole.train(8)
    reseeded = Run(scene)
    reseeded.train(4)
    reseeded.state.generator.manual_seed(11)
    reseeded.train(4)
    assert not torch.equal(reseeded.nerf.field.encoding.table, whole.nerf.field.encoding.table)


def test_a_state_for_other_parameter_groups_is_refused_with_the_groups_named(scene):
    run = Run(scene)
    run.train(1)
    tensors, meta = run.state.to_tensors()
    other = TrainingState(make_optimizer([ParamGroup("field", list(run.nerf.field.parameters()), 0.01)]),
                          torch.Generator())
    with pytest.raises(ValueError, match=r"saved for groups \[\('grid', 1\), \('networks', \d+\)\].*"
                                         r"this optimiser has \[\('field', \d+\)\]"):
        other.load_tensors(tensors, meta)
    with pytest.raises(ValueError, match="format"):
        run.state.load_tensors(tensors, {**meta, "format": "something else"})


# --------------------------------------------------------------------------------------------- stopping

def test_a_stop_after_the_occupancy_refresh_leaves_the_last_finished_step(scene):
    run = Run(scene)
    run.train(2)  # the next step (index 2) begins with the full grid refresh
    before = run.snapshot()

    refreshed = []
    real_update = run.nerf.occupancy.update

    def update(*args, **kwargs):
        real_update(*args, **kwargs)
        refreshed.append(run.nerf.occupancy.density.clone())

    run.nerf.occupancy.update = update

    def stop_once_refreshed():
        if refreshed:
            raise Stop

    with pytest.raises(Stop):
        run.train(3, check_interrupt=stop_once_refreshed)
    assert len(refreshed) == 1 and not torch.equal(refreshed[0], before["occupancy.density"])  # it did change
    assert run.state.step == 2
    assert_same(run.snapshot(), before)  # weights, grid, optimiser and random stream of step 2

    del run.nerf.occupancy.update  # the stopped step, run again, is the step an uninterrupted run takes
    run.train(2)
    whole = Run(scene)
    whole.train(4)
    assert_same(run.snapshot(), whole.snapshot())


def test_fit_views_stopped_after_a_grid_refresh_keeps_the_grid_of_its_last_step(scene):
    cameras, images, masks = scene
    nerf = new_nerf()
    settings = FitSettings(steps=1, rays_per_step=RAYS, seed=5, occupancy_interval=1)  # masks: no warm-up
    fit_views(nerf, images, cameras, masks, settings)
    params = {n: p.detach().clone() for n, p in nerf.field.named_parameters()}
    grid = {k: v.clone() for k, v in nerf.occupancy.state_dict().items()}
    training_before = nerf.training

    refreshed = []
    real_update = nerf.occupancy.update
    nerf.occupancy.update = lambda *a, **kw: (real_update(*a, **kw), refreshed.append(1))

    def stop_once_refreshed():
        if refreshed:
            raise Stop

    with pytest.raises(Stop):
        fit_views(nerf, images, cameras, masks, FitSettings(steps=3, rays_per_step=RAYS, seed=5,
                                                            occupancy_interval=1),
                  check_interrupt=stop_once_refreshed)
    assert refreshed == [1]
    assert nerf.training is training_before and nerf.steps_trained == 1
    assert_same({n: p.detach() for n, p in nerf.field.named_parameters()}, params)
    assert_same(nerf.occupancy.state_dict(), grid)


def test_a_stop_from_on_step_comes_after_the_step_is_counted(scene):
    run = Run(scene)
    seen = []

    def on_step(done: StepDone):
        assert math.isfinite(done.result.psnr) and done.result.loss > 0
        seen.append((done.step, done.count, done.total))
        if done.count == 2:
            raise Stop

    with pytest.raises(Stop):
        run.train(5, on_step=on_step)
    assert run.state.step == 2
    assert seen == [(1, 1, 5), (2, 2, 5)]
    whole = Run(scene)
    whole.train(2)
    assert_same(run.snapshot(), whole.snapshot())


# ------------------------------------------------------------------------------------------------ groups

def test_each_parameter_group_trains_at_its_own_learning_rate():
    torch.manual_seed(0)
    params = {"field": torch.nn.Parameter(torch.randn(5)), "background": torch.nn.Parameter(torch.randn(3)),
              "part_features": torch.nn.Parameter(torch.randn(4, 2))}
    lrs = {"field": 1e-2, "background": 1e-3, "part_features": 5e-2}
    optimizer = make_optimizer([ParamGroup(n, [p], lrs[n]) for n, p in params.items()])
    assert [(g["name"], g["lr"]) for g in optimizer.param_groups] == list(lrs.items())
    before = {n: p.detach().clone() for n, p in params.items()}
    weights = {n: torch.randn(p.shape) for n, p in params.items()}

    def step_fn(step):
        sum((params[n] * weights[n]).sum() for n in params).backward()

    train(TrainingState(optimizer, torch.Generator()), step_fn, 1)
    for name, p in params.items():
        # Adam's first step is lr * g / (|g| + eps): every element moves by its group's learning rate.
        moved = (p.detach() - before[name]).abs()
        torch.testing.assert_close(moved, torch.full_like(moved, lrs[name]), rtol=0, atol=1e-6)  # float32 rounding

    set_learning_rates(optimizer, {"background": 0.5})
    assert [g["lr"] for g in optimizer.param_groups] == [1e-2, 0.5, 5e-2]
    with pytest.raises(ValueError, match=r"no parameter group named \['sky'\]; the optimiser has "
                                         r"\['field', 'background', 'part_features'\]"):
        set_learning_rates(optimizer, {"sky": 1.0})
    with pytest.raises(ValueError, match="names must be unique"):
        make_optimizer([ParamGroup("a", [params["field"]], 0.1), ParamGroup("a", [params["background"]], 0.1)])


def test_loading_an_optimizer_state_keeps_the_moments_and_the_saved_rates_until_set():
    w = torch.nn.Parameter(torch.ones(3))
    first = make_optimizer([ParamGroup("w", [w], 0.1)], kind="adamw", weight_decay=0.01)
    w.grad = torch.ones(3)
    first.step()
    second = make_optimizer([ParamGroup("w", [w], 0.7)], kind="adamw", weight_decay=0.01)
    load_optimizer_state(second, first.state_dict())
    assert second.param_groups[0]["lr"] == 0.1
    assert torch.equal(second.state[w]["exp_avg"], first.state[w]["exp_avg"])


# ---------------------------------------------------------------------------------------------- schedule

@pytest.mark.parametrize("interval, warmup, expected", [
    (16, 64, {64: 1.0, 80: 0.25, 96: 0.25}),
    (16, 0, {16: 1.0, 32: 0.25, 48: 0.25}),
    (4, 64, {64: 1.0, 68: 0.25, 72: 0.25}),
    (16, 70, {80: 1.0, 96: 0.25}),  # a warm-up between refreshes: the first refresh after it is the full one
    (1, 0, {1: 1.0, 2: 0.25, 3: 0.25}),
])
def test_the_occupancy_grid_is_refreshed_fully_once_after_the_warmup_then_in_part(interval, warmup, expected):
    schedule = OccupancySchedule(interval=interval, warmup=warmup)
    last = max(expected)
    got = {s: schedule.update_fraction(s) for s in range(last + 1) if schedule.update_fraction(s) is not None}
    assert got == expected
    assert not schedule.skips_empty(warmup - 1) and schedule.skips_empty(warmup)
    with pytest.raises(ValueError, match="interval: expected a whole number >= 1, got 0"):
        OccupancySchedule(interval=0)
