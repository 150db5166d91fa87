"""A planted test of the SD3 attention capture node: tiny SD3 weights are set so that one text token's key matches
the queries of a known region of the image-token grid, and the captured part map of that token must peak there.

The plant (joint block 0 of the tiny MMDiT, the block the node reads with ``blocks="0"``):

* ``x_embedder`` zeroed: every image token is its positional embedding alone (the view's content, the noise and
  the timestep cannot reach block 0's attention input).
* ``pos_embed``: the rows of the region R of the cropped token grid (ComfyUI crops the centre of the
  ``pos_embed_max_size``-square grid) are ``10 u`` plus small noise, u a zero-mean unit vector; every other row
  is random.
* Block 0's ``adaLN_modulation`` zeroed (image and text side): shift = scale = 0, so the attention input is
  ``norm1(token)`` (a LayerNorm without affine), and gates = 0, so block 0 adds nothing to the residual stream.
* Block 0's ``attn.qkv``: q and k parts the identity, bias 0, so q = k = norm1(token).
* ``context_embedder``: text token j becomes ``u (w . ctx_j) / |w|^2`` plus a large part orthogonal to u made
  from ctx_j's component orthogonal to w (:func:`text_embedding`), w the chosen word's CLIP context vector: the
  chosen word's token is exactly u, every other token points mostly elsewhere.

So the chosen word's key is ``norm1(u) = sqrt(C) u`` (C = hidden size), the queries of R are the same vector and
every other query is a random one: R's queries give the chosen key the logit C / (H sqrt(D)) per head (8 here)
while the others give it about N(0, 1). Its map must peak in R; another word's map must not (a capture reading
the wrong text column fails; the capture reads "red" next to "cube" to show it). Two broken plants show that the
assertions can fail: R planted at its transpose (the map then peaks there, so a transposed or flipped reading of
the token grid fails the test), and the context embedder planted with -u (the chosen key points away from R).

Oracle for the exact value: block 0's input does not depend on the latent or the timestep, so every recorded
step reads the same probabilities, which are computed here from the planted tensors with a plain softmax.
"""
from __future__ import annotations

import pytest
import torch

from compose3d.kernels.cameras import orbit_cameras
from compose3d.nodes.sd3_capture import PARTS, SD3AttentionCapture
from compose3d.nodes.tokens import locate_phrases
from harness.inprocess import run_node
from harness.tiny_models import file_digest

PROMPT = "a red cube"
PART = "cube"
#: "cube" is CLIP's one token after the start token, "a" and "red": context column 3.
PART_COLUMN = 3
#: A second part read in the same capture: "red" (column 2), a word whose key is not planted.
OTHER, OTHER_COLUMN = "red", 2
#: The maps' order: the parts input lists "red" first, so the planted part's map is the second one.
MAP_OF = {OTHER: 0, PART: 1}
VIEWS = 2
VIEW_SIZE = 64
RESOLUTION = 128
GRID = RESOLUTION // 16  # image tokens per side (SD3: one token per 16x16 pixels)
#: Small settings. The 10-step schedule's timesteps are 1000, 964, ..., 250: the 9 below 1000 are in the window
#: [1, 999] and recorded; sdedit_timestep 0 anchors every step to the view (with 999 only the t = 1000 step
#: would be, and the rest would run freely; block 0 reads position only, so either gives the same maps).
SETTINGS = dict(prompt=PROMPT, parts=f"{OTHER}, {PART}", blocks="0", t_low=1.0, t_high=999.0, sdedit_timestep=0.0,
                steps=10, cfg=1.0, resolution=RESOLUTION, map_size=GRID, text_tokens="clip", view_words=False,
                seed=5, negative="")


def region(rows: tuple[int, int], cols: tuple[int, int]) -> torch.Tensor:
    """(GRID, GRID) bool: True on rows[0]..rows[1]-1 x cols[0]..cols[1]-1 of the token grid (row = image y)."""
    mask = torch.zeros(GRID, GRID, dtype=torch.bool)
    mask[rows[0]:rows[1], cols[0]:cols[1]] = True
    return mask


#: R: the top-right quarter of the token grid. Not symmetric under a transpose or a flip of either axis.
R = region((0, GRID // 2), (GRID // 2, GRID))
#: R's transpose (the bottom-left quarter): where a transposed reading of the grid would put R.
R_TRANSPOSED = R.T.contiguous()


def load_checkpoint(tiny_models, clip: bool = True):
    """What core CheckpointLoaderSimple does: comfy.sd.load_checkpoint_guess_config on a checkpoints file."""
    import comfy.sd
    import folder_paths

    path = folder_paths.get_full_path_or_raise("checkpoints", tiny_models.sd3_checkpoint)
    with torch.inference_mode():
        model, text, vae, _ = comfy.sd.load_checkpoint_guess_config(
            path, output_vae=clip, output_clip=clip,
            embedding_directory=folder_paths.get_folder_paths("embeddings"))
    return model, text, vae


def unit_direction(hidden: int, seed: int) -> torch.Tensor:
    """A zero-mean unit vector (so a LayerNorm without affine maps ``a u`` to ``sqrt(hidden) u`` for a > 0)."""
    u = torch.randn(hidden, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    u = u - u.mean()
    return (u / u.norm()).float()


#: How strongly the text embedding spells out the part of a context vector that is not along w (see below).
SPREAD = 20.0


def text_embedding(w: torch.Tensor, u: torch.Tensor, sign: float, seed: int) -> torch.Tensor:
    """The planted context embedder's weight (hidden, 4096): ctx -> ``sign u (w . ctx) / |w|^2 + V P ctx``.

    P removes the component along w and V (a random map scaled by :data:`SPREAD`, its outputs orthogonal to u)
    spells out the rest. The part's token (ctx = w) becomes exactly ``sign u``. Why the second term: norm1 is a
    LayerNorm, so ``u (w . ctx_j)`` alone would become ``sqrt(C) u`` for every token with w . ctx_j > 0 (all 77
    of the tiny CLIP's context vectors, cosines 0.63 to 0.95 with w): every text token would share the part's
    key and reading the wrong column would go unnoticed. With it, a token at angle a to w keeps only about
    ``cos a / (SPREAD sin a)`` of its direction along u."""
    hidden, channels = u.shape[0], w.shape[0]
    w64, u64 = w.double(), u.double()
    along_w = torch.outer(u64, w64) / w64.dot(w64)
    gen = torch.Generator().manual_seed(seed)
    rest = torch.randn(hidden, channels, generator=gen, dtype=torch.float64) / hidden ** 0.5
    rest = rest - torch.outer(u64, u64 @ rest)  # outputs orthogonal to u
    rest = rest - torch.outer(rest @ w64, w64) / w64.dot(w64)  # blind to w
    return (sign * along_w + SPREAD / w64.norm() * rest).float()


def plant(model, w: torch.Tensor, where: torch.Tensor, sign: float = 1.0, seed: int = 0) -> torch.Tensor:
    """Plant ``where`` (GRID, GRID) and the text direction ``w`` (4096,) in block 0 of ``model`` (a ModelPatcher
    this test owns; its tensors are changed in place). Returns u."""
    dm = model.model.diffusion_model
    hidden = dm.hidden_size
    size = dm.pos_embed_max_size
    u = unit_direction(hidden, seed)
    gen = torch.Generator().manual_seed(seed + 1)
    table = torch.randn(size, size, hidden, generator=gen)  # any row outside R: a random direction
    top, left = (size - GRID) // 2, (size - GRID) // 2  # MMDiT.cropped_pos_embed's centre crop
    full = torch.zeros(size, size, dtype=torch.bool)
    full[top:top + GRID, left:left + GRID] = where
    table[full] = 10.0 * u + 0.01 * torch.randn(int(full.sum()), hidden, generator=gen)
    block = dm.joint_blocks[0]
    with torch.inference_mode():
        dm.x_embedder.proj.weight.zero_()
        dm.x_embedder.proj.bias.zero_()
        dm.pos_embed.copy_(table.reshape(1, size * size, hidden))
        for side in (block.x_block, block.context_block):
            modulation = side.adaLN_modulation[1]
            modulation.weight.zero_()
            modulation.bias.zero_()
            qkv = side.attn.qkv
            qkv.weight[:2 * hidden].copy_(torch.cat([torch.eye(hidden), torch.eye(hidden)]))
            qkv.bias[:2 * hidden].zero_()
        dm.context_embedder.weight.copy_(text_embedding(w, u, sign, seed + 2))
        dm.context_embedder.bias.zero_()
    return u


@pytest.fixture(scope="module")
def sd3(comfy_inprocess, tiny_models):
    """The module's own SD3 (model, clip, vae), the CLIP context of the prompt (1, 77, 4096) and the checkpoint
    file's digest before anything was planted."""
    digest = file_digest(tiny_models.path("checkpoints", tiny_models.sd3_checkpoint))
    model, clip, vae = load_checkpoint(tiny_models)
    with torch.inference_mode():
        context = clip.encode_from_tokens(clip.tokenize(PROMPT)).float().cpu()
    return model, clip, vae, context, digest


@pytest.fixture(scope="module")
def planted(sd3):
    """The module's model (no one else holds it) planted with R for the part's token."""
    model, _, _, context, _ = sd3
    plant(model, context[0, PART_COLUMN], R)
    return model


def planted_model(tiny_models, context: torch.Tensor, where: torch.Tensor, sign: float = 1.0):
    """A second, freshly loaded SD3 model of this test with ``where`` planted for the part's token."""
    model, _, _ = load_checkpoint(tiny_models, clip=False)
    plant(model, context[0, PART_COLUMN], where, sign)
    return model


@pytest.fixture(scope="module")
def views():
    """Two 64 px views (their content does not matter: image tokens are position only)."""
    gen = torch.Generator().manual_seed(11)
    return torch.rand(VIEWS, VIEW_SIZE, VIEW_SIZE, 3, generator=gen)


def capture(model, clip, vae, views, normalization: str) -> torch.Tensor:
    """The node's part maps (V, 2, GRID, GRID): "red" then "cube"."""
    cameras = orbit_cameras(VIEWS, 15.0)
    part_maps = run_node(SD3AttentionCapture, model=model, clip=clip, vae=vae, views=views, cameras=cameras,
                         normalization=normalization, **SETTINGS).result[0]
    assert part_maps.parts == (OTHER, PART) and part_maps.kind == normalization
    maps = part_maps.maps
    assert maps.shape == (VIEWS, 2, GRID, GRID) and bool(torch.isfinite(maps).all())
    return maps


def check_peaks_in(maps: torch.Tensor, where: torch.Tensor, part: str = PART, contrast: float = 3.0) -> None:
    """The test's assertion: in every view the map of ``part`` peaks in ``where`` and its mean there is more
    than ``contrast`` times its mean elsewhere."""
    for v in range(maps.shape[0]):
        m = maps[v, MAP_OF[part]]
        peak = divmod(int(m.argmax()), GRID)
        assert bool(where[peak]), f"view {v}: the map peaks at token {peak}, outside the planted region\n{m}"
        inside, outside = float(m[where].mean()), float(m[~where].mean())
        assert inside > contrast * outside, (f"view {v}: mean {inside:.4g} in the planted region is not "
                                             f"{contrast}x the mean {outside:.4g} outside\n{m}")


def expected_probabilities(model, context: torch.Tensor, column: int) -> torch.Tensor:
    """Block 0's attention probability of text token ``column`` for every image query, head-averaged:
    (GRID, GRID).

    Written out from the planted tensors: tokens = [context_embedder(ctx); cropped pos_embed], q = k =
    LayerNorm(tokens) (the identity qkv on a zero-modulated norm1), softmax over all keys per head."""
    dm = model.model.diffusion_model
    hidden, heads, size = dm.hidden_size, dm.num_heads, dm.pos_embed_max_size
    with torch.inference_mode():
        text = context[0].double() @ dm.context_embedder.weight.double().T
        table = dm.pos_embed.double().reshape(size, size, hidden)
    top = (size - GRID) // 2
    image = table[top:top + GRID, top:top + GRID].reshape(GRID * GRID, hidden)
    tokens = torch.nn.functional.layer_norm(torch.cat([text, image]), (hidden,), eps=1e-6)
    per_head = tokens.reshape(tokens.shape[0], heads, hidden // heads).transpose(0, 1)  # (H, L, D)
    logits = per_head[:, text.shape[0]:] @ per_head.transpose(1, 2) / (hidden // heads) ** 0.5
    probs = torch.softmax(logits, dim=-1)[:, :, column].mean(dim=0)
    return probs.reshape(GRID, GRID).float()


def test_part_columns_are_the_words_positions_after_the_start_token(sd3):
    _, clip, _, context, _ = sd3
    found = locate_phrases(clip, PROMPT, [OTHER, PART], PARTS)
    assert found.context_columns(["l"]) == [[OTHER_COLUMN], [PART_COLUMN]]
    assert context.shape == (1, 77, 4096)
    w = context[0, PART_COLUMN]
    assert float(w[:768].norm()) > 0 and bool((w[768:] == 0).all())


def test_planted_token_map_peaks_in_the_planted_region(sd3, planted, views):
    _, clip, vae, context, _ = sd3
    maps = capture(planted, clip, vae, views, "probability")
    check_peaks_in(maps, R)
    # The unplanted word's map, read in the same run, does not peak there (a capture reading the wrong column
    # of the text context would fail the check above).
    with pytest.raises(AssertionError, match="outside the planted region"):
        check_peaks_in(maps, R, part=OTHER)
    # The exact values: every recorded step reads block 0's probabilities, the same at every step and view.
    expected = expected_probabilities(planted, context, PART_COLUMN)
    assert bool(expected[R].min() > 3.0 * expected[~R].max())  # the plant itself separates R
    other = expected_probabilities(planted, context, OTHER_COLUMN)
    assert not bool(R[divmod(int(other.argmax()), GRID)])
    for v in range(VIEWS):
        torch.testing.assert_close(maps[v, MAP_OF[PART]], expected, rtol=2e-2, atol=1e-6)
        torch.testing.assert_close(maps[v, MAP_OF[OTHER]], other, rtol=2e-2, atol=1e-6)


def test_official_normalization_peaks_in_the_planted_region(sd3, planted, views):
    _, clip, vae, _, _ = sd3
    maps = capture(planted, clip, vae, views, "official")
    assert float(maps.min()) >= 0.0 and float(maps.max()) <= 1.0
    check_peaks_in(maps, R)


def test_broken_plant_at_the_transposed_region_fails_the_check(sd3, tiny_models, views):
    """The same plant at R's transpose: the map follows it, and the assertion made for R fails."""
    _, clip, vae, context, _ = sd3
    model = planted_model(tiny_models, context, R_TRANSPOSED)
    maps = capture(model, clip, vae, views, "probability")
    with pytest.raises(AssertionError, match="outside the planted region"):
        check_peaks_in(maps, R)
    check_peaks_in(maps, R_TRANSPOSED)


def test_broken_plant_with_the_opposite_key_fails_the_check(sd3, tiny_models, views):
    """The context embedder planted with -u: the part's key points away from R's queries; no peak in R."""
    _, clip, vae, context, _ = sd3
    model = planted_model(tiny_models, context, R, sign=-1.0)
    maps = capture(model, clip, vae, views, "probability")
    with pytest.raises(AssertionError, match="outside the planted region"):
        check_peaks_in(maps, R)
    for v in range(VIEWS):
        m = maps[v, MAP_OF[PART]]
        assert float(m[R].mean()) < float(m[~R].mean())


def test_planting_left_the_shared_checkpoint_file_unchanged(sd3, planted, tiny_models):
    assert file_digest(tiny_models.path("checkpoints", tiny_models.sd3_checkpoint)) == sd3[4]
