"""A picture of a camera rig: a top view (looking down -y) and a front view (looking along -z).

Framework-free (PIL + torch). Used by the PreviewCameras node so users can see where their cameras are.
"""
from __future__ import annotations

import torch
from PIL import Image, ImageDraw, ImageFont
from torch import Tensor

PANEL = 256
BACKGROUND = (24, 24, 28)
AXIS = (90, 90, 100)
FIRST = (235, 90, 70)
OTHER = (80, 160, 240)
TEXT = (220, 220, 220)


def _panel(points: Tensor, directions: Tensor, axes: tuple[int, int], flip: tuple[bool, bool], title: str,
           extent: float, towards_viewer: int) -> Image.Image:
    """Draw camera centres ``points`` (N,3) with view ``directions`` (N,3) projected on two world axes.

    Cameras are drawn back to front along world axis ``towards_viewer`` so the nearest stays visible.
    """
    img = Image.new("RGB", (PANEL, PANEL), BACKGROUND)
    draw = ImageDraw.Draw(img)
    font = ImageFont.load_default()
    half = PANEL / 2

    def to_px(p: Tensor) -> tuple[float, float]:
        u = float(p[axes[0]]) * (-1 if flip[0] else 1)
        v = float(p[axes[1]]) * (-1 if flip[1] else 1)
        return half + u / extent * (half - 16), half + v / extent * (half - 16)

    draw.line([(half, 8), (half, PANEL - 8)], fill=AXIS)
    draw.line([(8, half), (PANEL - 8, half)], fill=AXIS)
    for i in torch.argsort(points[:, towards_viewer], stable=True).tolist():
        colour = FIRST if i == 0 else OTHER
        x, y = to_px(points[i])
        tip = to_px(points[i] + directions[i] * 0.25 * extent)
        draw.line([(x, y), tip], fill=colour, width=2)
        draw.ellipse([x - 4, y - 4, x + 4, y + 4], fill=colour)
        if points.shape[0] <= 32:
            draw.text((x + 6, y - 6), str(i), fill=TEXT, font=font)
    draw.text((6, 4), title, fill=TEXT, font=font)
    return img


def draw_rig(c2w: Tensor) -> Tensor:
    """Render a preview of cameras ``c2w`` (N, 4, 4) as an image (256, 512, 3) float32 in [0, 1].

    Left: top view (x to the right, +z towards the bottom). Right: front view (x to the right, y up).
    Camera 0 is drawn in red, the others in blue; the short line shows where each camera looks.
    """
    c2w = c2w.detach().to("cpu", torch.float64)
    points = c2w[:, :3, 3]
    forward = -c2w[:, :3, 2]
    extent = max(float(points.abs().max()), 1e-6) * 1.15
    top = _panel(points, forward, axes=(0, 2), flip=(False, False), title="top (x right, +z down)",
                 extent=extent, towards_viewer=1)
    front = _panel(points, forward, axes=(0, 1), flip=(False, True), title="front (x right, y up)",
                   extent=extent, towards_viewer=2)
    canvas = Image.new("RGB", (2 * PANEL, PANEL))
    canvas.paste(top, (0, 0))
    canvas.paste(front, (PANEL, 0))
    return torch.frombuffer(bytearray(canvas.tobytes()), dtype=torch.uint8).view(PANEL, 2 * PANEL, 3).float() / 255
