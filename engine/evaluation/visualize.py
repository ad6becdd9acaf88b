"""Pictures of clips: an animated GIF grid and a PNG strip grid (pillow).

Clips are float tensors ``(n, 3, T, H, W)`` in [-1, 1] (vidpo's pixel convention). Both writers
upscale with nearest-neighbour (a 16 x 16 toy clip stays crisp), separate tiles with a thin grey
border, optionally print a small caption under each tile, and write atomically: the image goes to a
temporary name in the target folder and is moved into place with ``os.replace``, so a reader never
sees a half-written file.

* :func:`save_gif` -- one tile per clip, ``nrow`` tiles per row, one GIF frame per video frame;
* :func:`save_png_grid` -- one row per clip with its frames side by side (a "filmstrip").
"""
from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import List, Optional, Sequence

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

_BORDER = 2
_BORDER_RGB = (64, 64, 64)
_CAPTION_RGB = (230, 230, 230)
_CANVAS_RGB = (24, 24, 24)


def clips_to_uint8(clips: torch.Tensor) -> np.ndarray:
    """``(n, 3, T, H, W)`` in [-1, 1] -> uint8 array ``(n, T, H, W, 3)``: ``round((x + 1) * 127.5)``."""
    if clips.dim() != 5 or clips.shape[1] != 3:
        raise ValueError(f"clips must have shape (n, 3, T, H, W), got {tuple(clips.shape)}")
    pixels = ((clips.detach().float().cpu().clamp(-1, 1) + 1.0) * 127.5).round().to(torch.uint8)
    return pixels.permute(0, 2, 3, 4, 1).contiguous().numpy()


def _font() -> ImageFont.ImageFont:
    return ImageFont.load_default()


def _wrap(text: str, width_px: int, draw: ImageDraw.ImageDraw, font) -> List[str]:
    """Greedy word wrap to ``width_px``; a word longer than the width is cut character-wise."""
    lines: List[str] = []
    current = ""
    for word in text.split():
        trial = word if not current else current + " " + word
        if draw.textlength(trial, font=font) <= width_px:
            current = trial
            continue
        if current:
            lines.append(current)
        while draw.textlength(word, font=font) > width_px and len(word) > 1:
            cut = len(word)
            while cut > 1 and draw.textlength(word[:cut], font=font) > width_px:
                cut -= 1
            lines.append(word[:cut])
            word = word[cut:]
        current = word
    if current:
        lines.append(current)
    return lines


def _caption_layout(captions: Optional[Sequence[str]], width_px: int):
    """Wrapped lines per caption and the caption band height (0 without captions)."""
    if not captions:
        return None, 0
    font = _font()
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    wrapped = [_wrap(str(c), width_px, probe, font) for c in captions]
    ascent, descent = font.getmetrics() if hasattr(font, "getmetrics") else (9, 2)
    line_h = ascent + descent + 1
    band = max(len(lines) for lines in wrapped) * line_h + 2 if wrapped else 0
    return (wrapped, line_h, font), band


def _atomic_save(image_or_frames, path: Path, fmt: str, **kwargs) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=str(path.parent))
    try:
        with os.fdopen(fd, "wb") as handle:
            image_or_frames.save(handle, format=fmt, **kwargs)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _check_captions(captions, n):
    if captions is not None and len(captions) != n:
        raise ValueError(f"got {len(captions)} captions for {n} clips")


def save_gif(clips: torch.Tensor, path, nrow: int = 8, scale: int = 4,
             captions: Optional[Sequence[str]] = None, fps: float = 4) -> Path:
    """Animated GIF of ``clips (n, 3, T, H, W)`` in a grid of ``nrow`` tiles per row; returns the path.

    Tile = one clip upscaled ``scale`` times (nearest neighbour); GIF frame ``t`` shows frame ``t`` of
    every clip; frame duration ``1000 / fps`` ms, looping forever.
    """
    path = Path(path)
    pixels = clips_to_uint8(clips)
    n, T, H, W, _ = pixels.shape
    _check_captions(captions, n)
    if n == 0:
        raise ValueError("save_gif: no clips")
    nrow = max(1, min(int(nrow), n))
    rows = (n + nrow - 1) // nrow
    tile_w, tile_h = W * scale, H * scale
    layout, band = _caption_layout(captions, tile_w)
    cell_w, cell_h = tile_w + _BORDER, tile_h + band + _BORDER
    canvas_w, canvas_h = nrow * cell_w + _BORDER, rows * cell_h + _BORDER

    background = Image.new("RGB", (canvas_w, canvas_h), _BORDER_RGB)
    if layout is not None:
        wrapped, line_h, font = layout
        draw = ImageDraw.Draw(background)
        for i, lines in enumerate(wrapped):
            x0 = _BORDER + (i % nrow) * cell_w
            y0 = _BORDER + (i // nrow) * cell_h + tile_h
            draw.rectangle([x0, y0, x0 + tile_w - 1, y0 + band - 1], fill=_CANVAS_RGB)
            for k, line in enumerate(lines):
                draw.text((x0 + 1, y0 + 1 + k * line_h), line, fill=_CAPTION_RGB, font=font)

    frames = []
    for t in range(T):
        frame = background.copy()
        for i in range(n):
            tile = Image.fromarray(pixels[i, t]).resize((tile_w, tile_h), Image.NEAREST)
            frame.paste(tile, (_BORDER + (i % nrow) * cell_w, _BORDER + (i // nrow) * cell_h))
        frames.append(frame)
    # One shared palette for all frames keeps colours stable across the animation.
    palette_source = frames[0].quantize(colors=255, method=Image.Quantize.MEDIANCUT)
    frames = [f.quantize(palette=palette_source, dither=Image.Dither.NONE) for f in frames]
    duration = max(20, int(round(1000.0 / float(fps))))
    _atomic_save(frames[0], path, "GIF", save_all=True, append_images=frames[1:], duration=duration,
                 loop=0, optimize=False)
    return path


def save_png_grid(clips: torch.Tensor, path, scale: int = 4, captions: Optional[Sequence[str]] = None,
                  max_rows: Optional[int] = None) -> Path:
    """One PNG with one row per clip, its ``T`` frames side by side (upscaled ``scale`` times).

    A caption, if given, is printed under its row. ``max_rows`` keeps the first clips only.
    """
    path = Path(path)
    if max_rows is not None:
        clips = clips[:max_rows]
        captions = None if captions is None else list(captions)[:max_rows]
    pixels = clips_to_uint8(clips)
    n, T, H, W, _ = pixels.shape
    _check_captions(captions, n)
    if n == 0:
        raise ValueError("save_png_grid: no clips")
    tile_w, tile_h = W * scale, H * scale
    row_w = T * (tile_w + _BORDER) - _BORDER
    layout, band = _caption_layout(captions, row_w)
    cell_h = tile_h + band + _BORDER
    canvas = Image.new("RGB", (row_w + 2 * _BORDER, n * cell_h + _BORDER), _BORDER_RGB)
    draw = ImageDraw.Draw(canvas)
    for i in range(n):
        y0 = _BORDER + i * cell_h
        for t in range(T):
            tile = Image.fromarray(pixels[i, t]).resize((tile_w, tile_h), Image.NEAREST)
            canvas.paste(tile, (_BORDER + t * (tile_w + _BORDER), y0))
        if layout is not None:
            wrapped, line_h, font = layout
            draw.rectangle([_BORDER, y0 + tile_h, _BORDER + row_w - 1, y0 + tile_h + band - 1], fill=_CANVAS_RGB)
            for k, line in enumerate(wrapped[i]):
                draw.text((_BORDER + 1, y0 + tile_h + 1 + k * line_h), line, fill=_CAPTION_RGB, font=font)
    _atomic_save(canvas, path, "PNG")
    return path
