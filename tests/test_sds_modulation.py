"""DreamBeast's part-aware modulation in the SDS optimiser, in-process on the tiny MVDream.

Oracles: DreamBeast's bias formulas written out element by element (``oracles.cross_oracle`` / ``self_oracle``)
on planted part maps resized with ``F.interpolate``, attention written out as softmax(q k^T / sqrt(d) + bias) v,
the part tokens read from the tokenizer's ids here. The q/k/v are the ones the tiny MVDream UNet really computed
at every transformer block (a recording attention patch installed over the modulation's). A broken variant
(maps given to the wrong views and parts) shows that the planted measurements can fail.
"""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import compose3d.nodes.part_modulation as modulation_node
import compose3d.nodes.sds as sds_node
from compose3d.kernels.field import config_for_device
from compose3d.kernels.nerf import NeRF
from compose3d.kernels.part_field import PartField
from compose3d.kernels.part_maps import PartMaps
from compose3d.kernels.renderer import RenderSettings
from compose3d.nodes.attention_patch import patch_unet_attention
from compose3d.nodes.mvdream import MVDreamLoader
from compose3d.nodes.validation import InputError
from harness.inprocess import run_node
from oracles import cross_oracle, self_oracle
from test_sds import encode, run_sds

PROMPT = "a bird with a lion head and big wings, 3d asset"
PARTS = ("head", "wings")
MODULATED = dict(prompt=PROMPT, parts="head, wings", cross_strength=0.6, self_strength=1.2, modulation_start=0.0,
                 modulation_end=1.0)


def planted_maps(batch: int, h: int, w: int, broken: bool = False) -> torch.Tensor:
    """(batch, 2, h, w): part 0 a soft band on the left of even views and on the right of odd views, part 1 the
    rest (never exactly 0). ``broken``: views 0 and 1 get their parts swapped (wrong regions, and wrong
    part pairs between them and views 2, 3)."""
    x = (torch.arange(w, dtype=torch.float64) + 0.5) / w
    maps = []
    for v in range(batch):
        side = x if v % 2 == 0 else 1.0 - x
        head = torch.sigmoid((0.5 - side) * 20.0)[None].expand(h, w)
        maps.append(torch.stack([0.02 + 0.96 * head, 0.98 - 0.96 * head]))
    maps = torch.stack(maps)
    if broken:
        maps[:2] = maps[:2].flip(1)
    return maps


def resized(maps: torch.Tensor, size) -> torch.Tensor:
    return F.interpolate(maps, size=tuple(size), mode="bilinear", align_corners=False)


def token_columns(clip) -> list[list[int]]:
    """Each part word's columns in the context, from the tokenizer's ids (one token per word here)."""
    tokens = clip.tokenize(PROMPT)
    ids = [t[0] for t in next(iter(tokens.values()))[0]]
    columns = []
    for word in PARTS:
        word_ids = [t[0] for t in next(iter(clip.tokenize(word).values()))[0]]
        word_id = word_ids[1]  # after the start token
        columns.append([i for i, t in enumerate(ids) if t == word_id])
    return columns


@pytest.fixture(scope="module")
def mv(comfy_inprocess, tiny_models):
    model, clip, vae = run_node(MVDreamLoader, ckpt_name=tiny_models.mvdream_checkpoint).result
    return model, clip, vae, encode(clip, PROMPT), encode(clip, "")


def part_field() -> PartField:
    nerf = NeRF.create(config_for_device("cpu"), render=RenderSettings(16), seed=1)
    return PartField.on_geometry(nerf, PARTS, seed=2)


class AttentionRecord:
    """Replaces ``MVDreamPredictor`` so that a recording attn1/attn2 patch sits over whatever the run installed:
    every call's q, k, v, batch chunks, resolution, heads and output."""

    def __init__(self, monkeypatch):
        self.calls = []
        record = self

        class Recording(sds_node.MVDreamPredictor):
            def __init__(self, guider, model_options, guidance):
                unet = guider.inner_model.diffusion_model
                for which in ("attn2", "attn1"):
                    model_options = patch_unet_attention(model_options, unet, which, record.patch(which))
                super().__init__(guider, model_options, guidance)

        monkeypatch.setattr(sds_node, "MVDreamPredictor", Recording)

    def patch(self, which):
        def make(key, fallback):
            def patched(q, k, v, extra):
                out = fallback(q, k, v, extra)
                self.calls.append(dict(which=which, key=key, q=q.detach().clone(), k=k.detach().clone(),
                                       v=v.detach().clone(), chunks=list(extra["cond_or_uncond"]),
                                       size=tuple(extra["activations_shape"][-2:]), heads=extra["n_heads"],
                                       out=out.detach().clone()))
                return out

            return patched

        return make


def plant(monkeypatch, broken: bool = False) -> None:
    def render(field, cameras, h, w, settings=None, on_progress=None):
        return PartMaps(planted_maps(len(cameras), h, w, broken).float(), cameras, field.parts, "exact")

    monkeypatch.setattr(modulation_node, "render_part_maps", render)


def probabilities(q, k, heads, bias=None) -> torch.Tensor:
    """(B, Lq, Lk) head-averaged softmax(q k^T / sqrt(d) + bias), in float64."""
    b, lq, c = q.shape
    d = c // heads
    qh = q.double().reshape(b, lq, heads, d).transpose(1, 2)
    kh = k.double().reshape(b, k.shape[1], heads, d).transpose(1, 2)
    logits = qh @ kh.transpose(-1, -2) / math.sqrt(d)
    if bias is not None:
        logits = logits + bias
    return torch.softmax(logits, dim=-1).mean(dim=1)


def attention_out(q, k, v, heads, bias=None) -> torch.Tensor:
    b, lq, c = q.shape
    d = c // heads
    qh, kh, vh = (t.double().reshape(b, t.shape[1], heads, -1).transpose(1, 2) for t in (q, k, v))
    logits = qh @ kh.transpose(-1, -2) / math.sqrt(d)
    if bias is not None:
        logits = logits + bias
    return (torch.softmax(logits, dim=-1) @ vh).transpose(1, 2).reshape(b, lq, -1)


class Biases:
    """The oracle biases of a 4-view batch's planted maps at 8x8 latents, per attention resolution."""

    def __init__(self, columns, length=77, broken=False):
        self.maps = planted_maps(4, 8, 8, broken)
        self.columns, self.length = columns, length
        self._cross, self._self = {}, {}

    def cross(self, size):
        if size not in self._cross:
            self._cross[size] = cross_oracle(resized(self.maps, size), self.columns, self.length, 0.6)
        return self._cross[size]  # (4, hw, L)

    def self(self, size):
        if size not in self._self:
            self._self[size] = self_oracle(resized(self.maps, size), 1.2)
        return self._self[size]  # (4hw, 4hw)


def cond_rows(call):
    rows = call["q"].shape[0] // len(call["chunks"])
    return [(kind, slice(i * rows, (i + 1) * rows)) for i, kind in enumerate(call["chunks"])]


@pytest.fixture(scope="module")
def runs(mv, request):
    """One SDS step (64 px, 4 views) recorded: plain, modulated (both terms) and modulated with broken maps."""
    model, clip, vae, positive, negative = mv
    field = part_field()
    out = {}
    for name in ("plain", "modulated", "broken"):
        with pytest.MonkeyPatch.context() as mp:
            record = AttentionRecord(mp)
            extra = {}
            if name != "plain":
                plant(mp, broken=name == "broken")
                extra = dict(MODULATED, part_field=field, clip=clip)
            run_sds(model, vae, positive, negative, steps=1, **extra)
            out[name] = record.calls
    return out


def test_the_patched_attention_adds_the_formulas_biases_to_the_conditional_rows_at_every_block(mv, runs):
    columns = token_columns(mv[1])
    assert all(columns) and columns[0] != columns[1]
    biases = Biases(columns)
    sizes = {"attn1": set(), "attn2": set()}
    for call in runs["modulated"]:
        size, heads = call["size"], call["heads"]
        sizes[call["which"]].add(size)
        for kind, rows in cond_rows(call):
            bias = None
            if kind == 0:
                bias = biases.cross(size)[:, None] if call["which"] == "attn2" else biases.self(size)[None, None]
            expected = attention_out(call["q"][rows], call["k"][rows], call["v"][rows], heads, bias)
            torch.testing.assert_close(call["out"][rows].double(), expected, atol=2e-5, rtol=1e-4)
    # the tiny UNet's levels and its middle block
    assert sizes["attn2"] == sizes["attn1"] == {(8, 8), (4, 4), (2, 2), (1, 1)}
    assert {c["which"] for c in runs["modulated"]} == {"attn1", "attn2"}
    assert all(sorted(c["chunks"]) == [0, 1] for c in runs["modulated"])  # cond and uncond in every call


def cross_mass_inside(calls, columns, maps, views=slice(None)) -> list[float]:
    """Per attn2 call: the share of each part's token attention that falls inside the part's planted region,
    averaged over parts and the ``views`` (cond rows; the probabilities that ran, with the bias if any)."""
    shares = []
    for call in calls:
        if call["which"] != "attn2" or call["size"] == (1, 1):  # no region at the middle block's one token
            continue
        (_, rows), = [(kind, r) for kind, r in cond_rows(call) if kind == 0]
        p = call["p"][views]  # (V, hw, L)
        region = resized(maps, call["size"]).flatten(2)[views] > 0.5  # (V, K, hw)
        part = []
        for k, cols in enumerate(columns):
            mass = p[:, :, cols].sum(-1)  # (4, hw)
            part.append(float((mass * region[:, k]).sum() / mass.sum()))
        shares.append(sum(part) / len(part))
    return shares


def same_part_share(calls, maps) -> list[float]:
    """Per attn1 call: of the attention a token pays to the other views, the share paid to tokens of its own
    planted part (cond rows, averaged over tokens)."""
    shares = []
    for call in calls:
        if call["which"] != "attn1" or call["size"] == (1, 1):
            continue
        h, w = call["size"]
        n = h * w
        p = call["p"][0]  # (4n, 4n): one object
        label = (resized(maps, (h, w))[:, 0].flatten(1) > 0.5).reshape(-1)  # (4n,) in part 0
        view = torch.arange(4).repeat_interleave(n)
        other = view[:, None] != view[None, :]
        same = label[:, None] == label[None, :]
        share = (p * (other & same)).sum(-1) / (p * other).sum(-1)
        shares.append(float(share.mean()))
    return shares


def with_probabilities(calls, biases: Biases | None):
    """The calls with ``p``: the cond rows' probabilities that ran (with the oracle bias in a modulated run)."""
    out = []
    for call in calls:
        (_, rows), = [(kind, r) for kind, r in cond_rows(call) if kind == 0]
        bias = None
        if biases is not None:
            bias = biases.cross(call["size"])[:, None] if call["which"] == "attn2" else \
                biases.self(call["size"])[None, None]
        out.append({**call, "p": probabilities(call["q"][rows], call["k"][rows], call["heads"], bias)})
    return out


def test_planted_maps_pull_each_parts_tokens_into_its_region_and_tokens_towards_their_part_in_other_views(mv,
                                                                                                        runs):
    columns = token_columns(mv[1])
    maps = planted_maps(4, 8, 8)
    plain = with_probabilities(runs["plain"], None)
    modulated = with_probabilities(runs["modulated"], Biases(columns))
    broken = with_probabilities(runs["broken"], Biases(columns, broken=True))

    def mean(values):
        return sum(values) / len(values)

    cross = [cross_mass_inside(c, columns, maps) for c in (plain, modulated)]
    for before, after in zip(*cross):
        assert after > before + 0.2  # at every layer
    # the broken maps push the tokens of the views they got wrong out of their regions
    wrong_views = [cross_mass_inside(c, columns, maps, slice(0, 2)) for c in (plain, broken)]
    assert mean(wrong_views[1]) < mean(wrong_views[0]) - 0.2

    same = [same_part_share(c, maps) for c in (plain, modulated, broken)]
    for before, after in zip(same[0], same[1]):
        assert after > before + 0.2
    assert mean(same[2]) < mean(same[0]) - 0.1


class PredictionRecord:
    """Records every step's (x0_cfg, x0_cond) predictions of a run."""

    def __init__(self, monkeypatch):
        self.outputs = []
        real = sds_node.MVDreamPredictor.__call__

        def call(predictor, *args):
            out = real(predictor, *args)
            self.outputs.append(tuple(o.detach().clone() for o in out))
            return out

        monkeypatch.setattr(sds_node.MVDreamPredictor, "__call__", call)


def predictions(mv, monkeypatch, **extra):
    model, clip, vae, positive, negative = mv
    with monkeypatch.context() as mp:
        record = PredictionRecord(mp)
        plant(mp)
        nerf, _, report = run_sds(model, vae, positive, negative, steps=4, **extra)
    return record.outputs, nerf, report


def test_zero_strengths_and_steps_outside_the_window_predict_bit_identically(mv, monkeypatch):
    field, clip = part_field(), mv[1]
    plain, plain_nerf, _ = predictions(mv, monkeypatch)
    off, off_nerf, off_report = predictions(mv, monkeypatch, **{**MODULATED, "cross_strength": 0.0,
                                                                "self_strength": 0.0}, part_field=field, clip=clip)
    window, _, report = predictions(mv, monkeypatch, **{**MODULATED, "modulation_start": 0.5}, part_field=field,
                                    clip=clip)
    assert len(plain) == len(off) == len(window) == 4
    for a, b in zip(plain, off):
        assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert torch.equal(plain_nerf.field.encoding.table, off_nerf.field.encoding.table)
    assert "part modulation" not in off_report
    # the window is steps 2-3 of 4: the patches are installed throughout but only act inside it
    for step in (0, 1):
        assert all(torch.equal(x, y) for x, y in zip(plain[step], window[step]))
    for step in (2, 3):
        assert not torch.allclose(plain[step][1], window[step][1], atol=1e-4)
    assert "part modulation: 2 steps" in report


def test_a_run_in_slices_follows_the_whole_runs_schedule(mv, monkeypatch):
    """Steps 0-2 then 2-4 of a 4-step schedule (a continued NeRF) see the timestep bounds of one 4-step run."""
    import compose3d.kernels.distill as distill

    model, _, vae, positive, negative = mv
    bounds = []
    real = distill.sample_timestep
    monkeypatch.setattr(distill, "sample_timestep", lambda b, g: bounds.append(b) or real(b, g))
    run_sds(model, vae, positive, negative, steps=4)
    whole, bounds[:] = list(bounds), []
    first, _, _ = run_sds(model, vae, positive, negative, steps=4, end_at_step=2)
    second, _, report = run_sds(model, vae, positive, negative, steps=4, start_at_step=2, nerf=first)
    assert bounds == whole
    assert first.steps_trained == 2 and second.steps_trained == 4
    assert report.startswith("SDS: 2 steps")


@pytest.mark.parametrize("change, message", [
    (dict(parts="head, wings", part_field=None), "part_field: missing"),
    (dict(parts=""), "parts: empty; with a part field give its parts' phrases .* \\(this field's parts: head, "
                     "wings\\)"),
    (dict(parts="head"), "parts: 1 part phrases \\(head\\) but the part field has 2 parts \\(head, wings\\)"),
    (dict(parts="head, tail"), "tail"),
    (dict(clip=None), "clip: missing"),
    (dict(prompt=""), "prompt"),
    (dict(modulation_start=0.6, modulation_end=0.4), "modulation_start: 0.6 is not before modulation_end 0.4"),
    (dict(end_at_step=2, modulation_start=0.5), "modulation_start: the modulation window \\(steps 2-4 of 4\\) lies "
                                                "outside the steps this node runs \\(0-2\\)"),
    (dict(start_at_step=4), "start_at_step: 4 leaves no steps to run"),
])
def test_bad_modulation_inputs_are_refused_before_optimising(mv, monkeypatch, change, message):
    model, clip, vae, positive, negative = mv
    monkeypatch.setattr(sds_node, "optimise", lambda *a, **k: pytest.fail("optimisation started"))
    inputs = {**MODULATED, "part_field": part_field(), "clip": clip, **change}
    with pytest.raises(InputError, match=message):
        run_sds(model, vae, positive, negative, steps=4, **inputs)


def test_the_modulated_runs_preview_shows_the_part_field_next_to_the_render(mv, monkeypatch):
    model, clip, vae, positive, negative = mv
    shown = []

    class Recording(sds_node.Progress):
        def update(self, value, preview=None):
            if preview is not None:
                shown.append(preview)
            super().update(value, preview)

    monkeypatch.setattr(sds_node, "Progress", Recording)
    field = part_field()
    run_sds(model, vae, positive, negative, steps=1, part_field=field, clip=clip, **MODULATED)
    (preview,) = shown  # the last step shows one
    size = sds_node.PREVIEW_SIZE
    assert preview.shape == (size, 2 * size, 3)
    camera = sds_node.preview_cameras()[0]
    torch.testing.assert_close(preview[:, size:], sds_node.part_preview(field, camera))
    run_sds(model, vae, positive, negative, steps=1)
    assert shown[-1].shape == (size, size, 3)  # without a part field: the render alone
