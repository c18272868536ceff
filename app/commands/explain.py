"""``gsp explain QUERY GALLERY_ID``: a PNG panel of why a gallery item matches a query.

The query and the match side by side, then one row per top shared GSP prototype: the regions of
both images that send mass to that prototype, tinted in the prototype's colour, captioned with
its share of the similarity ("these regions matched through this part").
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from app.commands.options import add_gallery_option

TILE = 224
CAPTION = 26
PALETTE = (
    (230, 25, 75),
    (60, 180, 75),
    (0, 130, 200),
    (245, 130, 48),
    (145, 30, 180),
    (70, 240, 240),
    (240, 50, 230),
    (210, 245, 60),
)


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "explain",
        help="show why a gallery item matches a query (PNG panel)",
        description="Decompose the similarity of a query and a gallery item over GSP prototypes "
        "and draw, for the top shared prototypes, where each image found them.",
    )
    parser.add_argument("query", help="query image file, or the id of a gallery item")
    parser.add_argument("gallery_id", type=int, help="id of the gallery item to explain")
    parser.add_argument("--checkpoint", required=True, type=Path, help="checkpoint directory")
    add_gallery_option(parser)
    parser.add_argument("--out", required=True, type=Path, help="PNG panel to write")
    parser.add_argument("--top", type=int, default=3, help="prototypes to show (default 3)")
    parser.set_defaults(handler=run)


def _fail(message: str) -> int:
    print(f"error: {message}", file=sys.stderr)
    return 1


def _item_image(gallery: Any, item_id: int, resize_size: int) -> Any:
    """The source image of a gallery item (relative sources live in the gallery directory)."""
    record = gallery.get(item_id)
    if record is None:
        raise ValueError(f"no gallery item with id {item_id}")
    path = Path(record.source)
    if not path.is_absolute():
        path = gallery.directory / path
    return _read_image(path, resize_size)


def _read_image(path: Path, resize_size: int) -> Any:
    from index.images import decode_image
    from model.transforms import to_rgb

    return to_rgb(decode_image(path.read_bytes(), resize_size))


def run(args: argparse.Namespace) -> int:
    import torch

    from index.build import open_for_model
    from index.errors import GalleryError
    from model.checkpoint import load_checkpoint
    from model.explain import explain_pair
    from model.transforms import eval_transform

    if args.top < 1:
        return _fail(f"--top must be at least 1, got {args.top}")
    try:
        loaded = load_checkpoint(args.checkpoint, device="cpu")
        preprocessing = loaded.config.preprocessing
        with open_for_model(args.gallery, loaded, read_only=True) as gallery:
            query_path = Path(args.query)
            if not query_path.exists() and args.query.isdigit():
                query = _item_image(gallery, int(args.query), preprocessing.resize_size)
            else:
                query = _read_image(query_path, preprocessing.resize_size)
            match = _item_image(gallery, args.gallery_id, preprocessing.resize_size)
        transform = eval_transform(preprocessing)
        with torch.inference_mode():
            maps = loaded.net.features(torch.stack([transform(query), transform(match)]))
            explained = explain_pair(loaded.net, maps[0], maps[1], top=args.top)
    except (GalleryError, OSError, ValueError) as error:  # ExplainError is a ValueError
        return _fail(str(error))
    panel = render_panel(query, match, explained, preprocessing, args.gallery_id)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    panel.save(args.out, format="PNG")
    print(f"score {explained.score:.4f}; shared prototypes carry {explained.shared_share:.0%}")
    for part in explained.top:
        print(
            f"  prototype {part.prototype:>3}: shared term {part.term:+.4f} ({part.share:.0%}), "
            f"contribution {part.contribution:+.4f}"
        )
    print(f"panel written to {args.out}")
    return 0


def _network_view(image: Any, preprocessing: Any) -> Any:
    """The centred square the network saw, as a ``TILE`` x ``TILE`` RGB image."""
    from PIL import Image

    from model.explain import crop_box

    left, top, side = crop_box(image.width, image.height, preprocessing)
    box = (round(left), round(top), round(left + side), round(top + side))
    return image.crop(box).resize((TILE, TILE), Image.Resampling.BILINEAR)


def tint(image: Any, grid: Any, colour: tuple[int, int, int], opacity: float = 0.75) -> Any:
    """``image`` with ``grid`` (h, w; scaled by its maximum) painted on in one ``colour``."""
    import numpy as np
    from PIL import Image

    values = np.clip(np.nan_to_num(np.asarray(grid, dtype=np.float32)), 0.0, None)
    peak = float(values.max())
    values = values / peak if peak > 0 else values
    coverage = np.asarray(Image.fromarray(values).resize(image.size, Image.Resampling.BILINEAR))
    coverage = np.clip(coverage, 0.0, 1.0)[..., None]
    base = np.asarray(image.convert("RGB"), dtype=np.float32)
    dimmed = base * (0.55 + 0.45 * coverage)  # unmatched regions fade, matched ones stand out
    alpha = opacity * coverage
    mixed = dimmed * (1 - alpha) + alpha * np.array(colour, dtype=np.float32)
    return Image.fromarray(np.clip(mixed, 0, 255).astype(np.uint8))


def render_panel(query: Any, match: Any, explained: Any, preprocessing: Any, match_id: int) -> Any:
    """Query and match on top; one row per top prototype with both region maps in its colour."""
    from PIL import Image, ImageDraw

    query_view = _network_view(query, preprocessing)
    match_view = _network_view(match, preprocessing)
    rows = [
        (
            query_view,
            match_view,
            f"query  |  match {match_id}: cosine {explained.score:.3f}, "
            f"shared parts {explained.shared_share:.0%}",
            (0, 0, 0),
        )
    ]
    for position, part in enumerate(explained.top):
        colour = PALETTE[position % len(PALETTE)]
        rows.append(
            (
                tint(query_view, part.query_map.float().numpy(), colour),
                tint(match_view, part.match_map.float().numpy(), colour),
                f"prototype {part.prototype}: shared term {part.share:.0%} of the score, "
                f"all its terms {part.contribution / explained.score:.0%}",
                colour,
            )
        )
    panel = Image.new("RGB", (2 * TILE, len(rows) * (TILE + CAPTION)), (255, 255, 255))
    draw = ImageDraw.Draw(panel)
    for index, (left, right, caption, colour) in enumerate(rows):
        y = index * (TILE + CAPTION)
        panel.paste(left, (0, y))
        panel.paste(right, (TILE, y))
        draw.rectangle((0, y + TILE, 2 * TILE - 1, y + TILE + CAPTION - 1), fill=(255, 255, 255))
        draw.rectangle((4, y + TILE + 8, 14, y + TILE + 18), fill=colour)
        draw.text((20, y + TILE + 7), caption, fill=(0, 0, 0))
    return panel
