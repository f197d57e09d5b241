"""A contact sheet of layered samples: one row per sample, its composite, layers and masks side by side."""

from __future__ import annotations

from PIL import Image

__all__ = ["contact_sheet"]


def contact_sheet(samples: list, tile: int = 128) -> Image.Image:
    """One row per sample: composite, background, foregrounds (back to front), then their masks."""
    from PIL import ImageDraw

    from layerdiff.data.format import composite

    kmax = max((s.num_layers - 1 for s in samples), default=0)
    cols = 2 + 2 * kmax
    head, caption = 14, 14
    sheet = Image.new("RGB", (cols * tile, head + len(samples) * (tile + caption)), (24, 24, 24))
    draw = ImageDraw.Draw(sheet)
    labels = ["composite", "background", *(f"fg{k}" for k in range(1, kmax + 1)), *(f"mask{k}" for k in range(1, kmax + 1))]
    for c, label in enumerate(labels):
        draw.text((c * tile + 3, 1), label, fill=(200, 200, 200))
    for r, s in enumerate(samples):
        y = head + r * (tile + caption)
        cells = {0: composite(s), 1: s.background}
        for k, (fg, mask) in enumerate(zip(s.foregrounds, s.masks)):
            cells[2 + k] = fg
            cells[2 + kmax + k] = mask.convert("RGB")
        for c, img in cells.items():
            sheet.paste(img.resize((tile, tile), Image.NEAREST), (c * tile, y))
        text = f"{s.key}: {s.global_prompt}"
        max_chars = cols * tile // 6
        draw.text((3, y + tile + 1), text if len(text) <= max_chars else text[: max_chars - 3] + "...", fill=(230, 230, 230))
    return sheet
