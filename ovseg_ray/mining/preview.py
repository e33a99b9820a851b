"""A contact sheet of mined pairs: N random (masked crop, noun, score) tiles in one PNG.

Each tile is the pair's box (plus a margin) cut from the image, the pixels outside the mask dimmed
and the mask outlined, with the noun and cosine score written underneath.
"""

from __future__ import annotations

import math

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image, ImageDraw, ImageFont

from ..data import storage
from ..data.images import encode_png, load_image
from ..data.pair_store import pair_files
from ..data.pairs import PAIR_SCHEMA, decode_mask

CAPTION_HEIGHT = 22
OUTLINE = (255, 220, 0)


def read_pairs(uri: str) -> pa.Table:
    tables = []
    for file in pair_files(uri):
        fs, path = storage.filesystem(file)
        with fs.open(path, "rb") as handle:
            tables.append(pq.read_table(handle))
    table = pa.concat_tables(tables)
    missing = [name for name in ("image_uri", "noun", "rle_counts", "rle_size", "bbox", "score")
               if name not in table.column_names]
    if missing:
        raise ValueError(f"{uri} is not a pairs table: columns {missing} are missing (expected {PAIR_SCHEMA.names})")
    return table


def _font(size: int):
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow without FreeType sizes
        return ImageFont.load_default()


def pair_tile(image: np.ndarray, mask: np.ndarray, bbox, label: str, tile: int, margin: float = 0.15) -> Image.Image:
    """One tile: box crop with margin, outside-mask pixels dimmed, mask outlined, label below."""
    height, width = mask.shape
    x, y, w, h = (float(v) for v in bbox)
    pad_x, pad_y = max(2.0, w * margin), max(2.0, h * margin)
    x0, y0 = max(0, int(x - pad_x)), max(0, int(y - pad_y))
    x1, y1 = min(width, int(math.ceil(x + w + pad_x))), min(height, int(math.ceil(y + h + pad_y)))
    crop = image[y0:y1, x0:x1].astype(np.float32)
    region = mask[y0:y1, x0:x1]
    crop[~region] = crop[~region] * 0.3 + 40
    padded = np.pad(region, 1)
    interior = padded[:-2, 1:-1] & padded[2:, 1:-1] & padded[1:-1, :-2] & padded[1:-1, 2:]
    edge = region & ~interior
    crop[edge] = OUTLINE
    picture = Image.fromarray(crop.clip(0, 255).astype(np.uint8))
    scale = tile / max(picture.width, picture.height)
    picture = picture.resize((max(1, round(picture.width * scale)), max(1, round(picture.height * scale))),
                             Image.NEAREST if scale > 2 else Image.BILINEAR)
    canvas = Image.new("RGB", (tile, tile + CAPTION_HEIGHT), (24, 24, 24))
    canvas.paste(picture, ((tile - picture.width) // 2, (tile - picture.height) // 2))
    ImageDraw.Draw(canvas).text((4, tile + 3), label, fill=(255, 255, 255), font=_font(14))
    return canvas


def placeholder_tile(label: str, reason: str, tile: int) -> Image.Image:
    canvas = Image.new("RGB", (tile, tile + CAPTION_HEIGHT), (60, 20, 20))
    draw = ImageDraw.Draw(canvas)
    draw.text((4, tile // 2 - 8), reason[:40], fill=(255, 160, 160), font=_font(12))
    draw.text((4, tile + 3), label, fill=(255, 255, 255), font=_font(14))
    return canvas


def contact_sheet(pairs_uri: str, num: int = 16, seed: int = 0, tile: int = 192) -> tuple[np.ndarray, int]:
    """(H, W, 3) uint8 sheet of ``num`` random pairs (fewer if the table is smaller), and how many."""
    if num < 1:
        raise ValueError(f"num must be at least 1, got {num}")
    if tile < 32:
        raise ValueError(f"tile must be at least 32 pixels, got {tile}")
    table = read_pairs(pairs_uri)
    if table.num_rows == 0:
        raise ValueError(f"{pairs_uri} holds no pairs")
    rng = np.random.default_rng(seed)
    chosen = sorted(rng.choice(table.num_rows, size=min(num, table.num_rows), replace=False).tolist())
    rows = table.take(chosen).to_pylist()
    images: dict[str, np.ndarray | Exception] = {}
    tiles = []
    for row in rows:
        label = f"{row['noun']}  {row['score']:.3f}"
        uri = row["image_uri"]
        if uri not in images:
            try:
                images[uri] = load_image(uri)
            except (FileNotFoundError, ValueError) as exc:
                images[uri] = exc
        image = images[uri]
        if isinstance(image, Exception):
            tiles.append(placeholder_tile(label, f"image unavailable: {type(image).__name__}", tile))
            continue
        mask = decode_mask(row["rle_counts"], row["rle_size"])
        if mask.shape != image.shape[:2]:
            tiles.append(placeholder_tile(label, f"mask {mask.shape} != image {image.shape[:2]}", tile))
            continue
        tiles.append(pair_tile(image, mask, row["bbox"], label, tile))
    columns = math.ceil(math.sqrt(len(tiles)))
    rows_count = math.ceil(len(tiles) / columns)
    sheet = Image.new("RGB", (columns * (tile + 4) + 4, rows_count * (tile + CAPTION_HEIGHT + 4) + 4), (0, 0, 0))
    for index, picture in enumerate(tiles):
        r, c = divmod(index, columns)
        sheet.paste(picture, (4 + c * (tile + 4), 4 + r * (tile + CAPTION_HEIGHT + 4)))
    return np.asarray(sheet), len(tiles)


def write_contact_sheet(pairs_uri: str, out: str, num: int = 16, seed: int = 0, tile: int = 192) -> int:
    """Write the sheet PNG to ``out`` (path or s3://); returns the number of tiles."""
    sheet, count = contact_sheet(pairs_uri, num=num, seed=seed, tile=tile)
    storage.write_bytes(out, encode_png(sheet))
    return count
