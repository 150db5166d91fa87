"""The resumable training loop shared by reconstruction, SDS and the part field; the loss is the caller's.

Pieces, each usable alone:

- :class:`ParamGroup` / :func:`make_optimizer` / :func:`set_learning_rates`: named parameter groups (hash grid,
  networks, background, part features...), each with its own learning rate.
- :class:`OccupancySchedule`: when the occupancy grid is refreshed, and from which step samples skip empty cells.
- :class:`TrainingState`: what a resumed training needs besides the weights (step count, optimiser, random
  stream), written to and read from safetensors tensors plus a JSON-able dict (:meth:`TrainingState.to_tensors`,
  :meth:`TrainingState.load_tensors`, :func:`write_checkpoint`, :func:`read_checkpoint`): nothing is pickled.
- :func:`train`: the step loop. Each step optionally refreshes the occupancy grid, zeroes the gradients, calls the
  caller's step function (which draws its randomness from the state's generator and accumulates the gradients
  of one step, calling ``step.check_interrupt()`` wherever a stop may happen), and takes the optimiser step.

A step is all or nothing: if anything raises before the optimiser step (a Cancel from ``check_interrupt``), the
occupancy grid and the random stream are put back as they were when the step began and the step is not counted,
so the model holds exactly its last finished step. ``on_step`` runs after the step is counted.

Example (a one-parameter fit)::

    >>> w = torch.nn.Parameter(torch.zeros(()))
    >>> state = TrainingState(make_optimizer([ParamGroup("w", [w], lr=0.1)]), torch.Generator().manual_seed(0))
    >>> def step_fn(step):
    ...     loss = (w - 1.0) ** 2
    ...     loss.backward()
    ...     return float(loss.detach())
    >>> _ = train(state, step_fn, steps=3)
    >>> state.step, round(float(w.detach()), 2)  # Adam's early steps move by ~lr each
    (3, 0.3)
"""
from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field as dc_field
from typing import Generic, TypeVar

import torch
from torch import Tensor, nn

from .occupancy import OccupancyGrid

T = TypeVar("T")

#: ``format`` entry of the metadata written by :meth:`TrainingState.to_tensors`.
STATE_FORMAT = "compose3d.training_state/1"
#: Key of the JSON metadata inside a checkpoint file's safetensors header.
CHECKPOINT_METADATA_KEY = "compose3d"

OPTIMIZERS = {"adam": torch.optim.Adam, "adamw": torch.optim.AdamW}


# ------------------------------------------------------------------------------------------------ optimiser

@dataclass(frozen=True)
class ParamGroup:
    """Parameters trained at one learning rate. ``name`` identifies the group in states and messages."""

    name: str
    params: Sequence[nn.Parameter]
    lr: float


def make_optimizer(groups: Sequence[ParamGroup], kind: str = "adam", betas: tuple[float, float] = (0.9, 0.99),
                   eps: float = 1e-15, weight_decay: float = 0.0) -> torch.optim.Optimizer:
    """Adam (``kind="adam"``) or AdamW over named groups, each at its own learning rate.

    The defaults are Instant-NGP's (betas 0.9/0.99, eps 1e-15: hash-table entries that few samples reach keep
    moving). Each ``optimizer.param_groups[i]`` carries its group's ``"name"``. Empty groups are allowed (e.g. a
    background without parameters).
    """
    if kind not in OPTIMIZERS:
        raise ValueError(f"kind: expected one of {sorted(OPTIMIZERS)}, got {kind!r}")
    names = [g.name for g in groups]
    if len(set(names)) != len(names):
        raise ValueError(f"groups: names must be unique, got {names}")
    params = [{"params": list(g.params), "lr": g.lr, "name": g.name} for g in groups]
    return OPTIMIZERS[kind](params, betas=betas, eps=eps, weight_decay=weight_decay)


def group_names(optimizer: torch.optim.Optimizer) -> list[str | None]:
    """The ``name`` of each parameter group, in order (None for unnamed groups)."""
    return [g.get("name") for g in optimizer.param_groups]


def set_learning_rates(optimizer: torch.optim.Optimizer, lrs: Mapping[str, float]) -> None:
    """Set the learning rate of the groups named in ``lrs``; others keep theirs. Unknown names raise ValueError."""
    names = group_names(optimizer)
    unknown = [n for n in lrs if n not in names]
    if unknown:
        raise ValueError(f"lrs: no parameter group named {unknown}; the optimiser has {names}")
    for group in optimizer.param_groups:
        if group.get("name") in lrs:
            group["lr"] = lrs[group["name"]]


def load_optimizer_state(optimizer: torch.optim.Optimizer, state: Mapping) -> None:
    """``optimizer.load_state_dict(state)`` after checking that the saved groups are the optimiser's groups
    (same names, same sizes), with a message that says which differ. Hyper-parameters (learning rates too) come
    from ``state``: call :func:`set_learning_rates` afterwards to train at new rates."""
    saved = [(g.get("name"), len(g["params"])) for g in state["param_groups"]]
    ours = [(g.get("name"), len(g["params"])) for g in optimizer.param_groups]
    if saved != ours:
        raise ValueError(f"optimizer state: saved for groups {saved} (name, parameter count), but this optimiser "
                         f"has {ours}; resume with the same model and parameter groups")
    optimizer.load_state_dict(state)


# --------------------------------------------------------------------------------------- occupancy schedule

@dataclass(frozen=True)
class OccupancySchedule:
    """When the occupancy grid is refreshed during training.

    For the first ``warmup`` steps every sample is evaluated (the grid is not consulted: it does not yet know
    where the density is). From then on the grid is refreshed every ``interval`` steps: the first refresh
    (at the first multiple of ``interval`` that is >= ``warmup`` and > 0) re-evaluates every cell, later ones
    a random ``fraction`` of the cells.

    >>> s = OccupancySchedule(interval=16, warmup=64)
    >>> [(step, s.update_fraction(step)) for step in (0, 48, 63, 64, 72, 80)]
    [(0, None), (48, None), (63, None), (64, 1.0), (72, None), (80, 0.25)]
    >>> s.skips_empty(63), s.skips_empty(64)
    (False, True)
    """

    interval: int = 16
    warmup: int = 64
    fraction: float = 0.25

    def __post_init__(self):
        if self.interval < 1:
            raise ValueError(f"interval: expected a whole number >= 1, got {self.interval}")
        if self.warmup < 0:
            raise ValueError(f"warmup: expected a whole number >= 0, got {self.warmup}")

    def first_update(self) -> int:
        """The step of the first (full) refresh."""
        return -(-max(self.warmup, 1) // self.interval) * self.interval  # rounded up to a multiple of interval

    def update_fraction(self, step: int) -> float | None:
        """Fraction of the cells to refresh before step ``step`` (0-based, over the whole training), or None."""
        first = self.first_update()
        if step < first or step % self.interval:
            return None
        return 1.0 if step == first else self.fraction

    def skips_empty(self, step: int) -> bool:
        """Whether step ``step`` samples only occupied cells (after the warm-up)."""
        return step >= self.warmup


@dataclass
class OccupancyUpdates:
    """What :func:`train` needs to refresh an occupancy grid: the grid, the density ``(P, 3) -> (P,)`` to
    evaluate, the threshold of an occupied cell and the schedule."""

    grid: OccupancyGrid
    density: Callable[[Tensor], Tensor]
    threshold: float
    schedule: OccupancySchedule


# ------------------------------------------------------------------------------------------------- state

@dataclass
class TrainingState:
    """Everything a resumed training needs besides the model's weights.

    Attributes:
        optimizer: the optimiser (its moments and step counts are saved; its parameters are the model's).
        generator: the training's random stream; step functions and occupancy refreshes draw from it only.
        step: steps finished so far, over the whole training (resumes continue the count).
    """

    optimizer: torch.optim.Optimizer
    generator: torch.Generator
    step: int = 0

    def to_tensors(self) -> tuple[dict[str, Tensor], dict]:
        """The state as CPU tensors (copies, for ``safetensors.torch.save_file``) and a JSON-able dict.

        Tensors: ``"rng"`` (uint8 generator state) and ``"optimizer.<param index>.<key>"`` (e.g. Adam's
        ``exp_avg``, ``exp_avg_sq`` and scalar ``step``). The dict: ``format``, ``step``, ``optimizer`` (class
        name), ``param_groups`` (hyper-parameters, names and parameter indices) and ``values`` (non-tensor
        per-parameter state, if the optimiser has any).
        """
        sd = self.optimizer.state_dict()
        tensors = {"rng": self.generator.get_state().clone()}
        values: dict[str, dict] = {}
        for index, entries in sd["state"].items():
            for key, value in entries.items():
                if isinstance(value, Tensor):
                    tensors[f"optimizer.{index}.{key}"] = value.detach().to("cpu", copy=True).contiguous()
                else:
                    values.setdefault(str(index), {})[key] = _jsonable(f"optimizer state {index}.{key}", value)
        groups = [{k: _jsonable(f"param group {i} {k!r}", v) for k, v in g.items()}
                  for i, g in enumerate(sd["param_groups"])]
        meta = {"format": STATE_FORMAT, "step": int(self.step), "optimizer": type(self.optimizer).__name__,
                "param_groups": groups, "values": values}
        return tensors, meta

    def load_tensors(self, tensors: Mapping[str, Tensor], meta: Mapping) -> None:
        """Restore what :meth:`to_tensors` wrote into this state's optimiser and generator (made fresh for the
        same model), and its step count. Extra tensors (e.g. the model's weights in the same file) are ignored.
        Raises ValueError when the file is not a training state or was saved for another optimiser."""
        if meta.get("format") != STATE_FORMAT:
            raise ValueError(f"training state: format {meta.get('format')!r} is not {STATE_FORMAT!r}")
        kind = type(self.optimizer).__name__
        if meta.get("optimizer") != kind:
            raise ValueError(f"training state: saved for a {meta.get('optimizer')} optimiser, this one is {kind}")
        if "rng" not in tensors:
            raise ValueError("training state: the tensor 'rng' (the random stream) is missing")
        state: dict[int, dict] = {}
        for key, tensor in tensors.items():
            if key.startswith("optimizer."):
                _, index, name = key.split(".", 2)
                state.setdefault(int(index), {})[name] = tensor
        for index, entries in meta.get("values", {}).items():
            state.setdefault(int(index), {}).update(entries)
        groups = [{k: tuple(v) if isinstance(v, list) and k != "params" else v for k, v in g.items()}
                  for g in meta["param_groups"]]
        load_optimizer_state(self.optimizer, {"state": state, "param_groups": groups})
        self.generator.set_state(tensors["rng"].to(torch.uint8).cpu())
        self.step = int(meta["step"])


def _jsonable(what: str, value):
    """``value`` as JSON-able data (tuples become lists); TypeError naming ``what`` otherwise."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, (list, tuple)):
        return [_jsonable(what, v) for v in value]
    raise TypeError(f"{what}: {type(value).__name__} values cannot be saved as JSON")


def write_checkpoint(path, tensors: Mapping[str, Tensor], meta: Mapping) -> None:
    """Write ``tensors`` as a safetensors file whose header carries ``meta`` as JSON (under
    :data:`CHECKPOINT_METADATA_KEY`). Use prefixes to keep a model's weights and a training state apart."""
    from safetensors.torch import save_file

    data = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    save_file(data, str(path), metadata={CHECKPOINT_METADATA_KEY: json.dumps(meta)})


def read_checkpoint(path) -> tuple[dict[str, Tensor], dict]:
    """The ``(tensors, meta)`` that :func:`write_checkpoint` wrote (tensors on the CPU)."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        header = f.metadata() or {}
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    if CHECKPOINT_METADATA_KEY not in header:
        raise ValueError(f"{path}: not a Compose3D checkpoint (no {CHECKPOINT_METADATA_KEY!r} metadata)")
    return tensors, json.loads(header[CHECKPOINT_METADATA_KEY])


# ------------------------------------------------------------------------------------------------- loop

@dataclass(frozen=True)
class Step:
    """What a step function gets.

    Attributes:
        index: 0-based step index over the whole training (a resumed training continues it).
        generator: the random stream to draw this step's randomness from (rays, timesteps, cameras...).
        check_interrupt: call between pieces of work (e.g. before each chunk); it raises to stop the training.
    """

    index: int
    generator: torch.Generator
    check_interrupt: Callable[[], None] = dc_field(default=lambda: None)


@dataclass(frozen=True)
class StepDone(Generic[T]):
    """Passed to ``on_step`` after each finished step: ``step`` steps finished in total, ``count`` of ``total``
    in this call of :func:`train`, and what the step function returned."""

    step: int
    count: int
    total: int
    result: T


def train(state: TrainingState, step_fn: Callable[[Step], T], steps: int, *,
          occupancy: OccupancyUpdates | None = None,
          on_step: Callable[[StepDone[T]], None] | None = None,
          check_interrupt: Callable[[], None] | None = None) -> TrainingState:
    """Run ``steps`` training steps from ``state`` (updated in place and returned).

    Each step: refresh ``occupancy`` if its schedule says so (``check_interrupt`` before each density chunk),
    zero the gradients, ``result = step_fn(Step(...))`` (accumulates the step's gradients), optimiser step,
    ``state.step += 1``, ``on_step(StepDone(...))``.

    ``check_interrupt`` or ``on_step`` may raise to stop. A stop inside a step (before its optimiser step) puts
    the occupancy grid and ``state.generator`` back to where the step began and leaves ``state.step`` as it was:
    the parameters, optimiser, grid and random stream are those of the last finished step, so saving ``state``
    then and resuming gives the same result as never stopping. (The gradients of the unfinished step are left
    in ``.grad``.)
    """
    interrupt = check_interrupt if check_interrupt is not None else _no_interrupt
    for count in range(1, steps + 1):
        index = state.step
        rng_before = state.generator.get_state()
        grid_before = None
        try:
            if occupancy is not None:
                fraction = occupancy.schedule.update_fraction(index)
                if fraction is not None:
                    grid_before = {k: v.clone() for k, v in occupancy.grid.state_dict().items()}
                    _refresh(occupancy, fraction, state.generator, interrupt)
            state.optimizer.zero_grad(set_to_none=True)
            result = step_fn(Step(index, state.generator, interrupt))
            state.optimizer.step()
        except BaseException:
            state.generator.set_state(rng_before)
            if grid_before is not None:
                occupancy.grid.load_state_dict(grid_before)
            raise
        state.step = index + 1
        if on_step is not None:
            on_step(StepDone(state.step, count, steps, result))
    return state


def _refresh(occupancy: OccupancyUpdates, fraction: float, generator: torch.Generator,
             interrupt: Callable[[], None]) -> None:
    def density(points: Tensor) -> Tensor:
        interrupt()
        return occupancy.density(points)

    occupancy.grid.update(density, occupancy.threshold, fraction=fraction, generator=generator)


def _no_interrupt() -> None:
    return None
