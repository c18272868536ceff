"""``gsp index``: build, add to, remove from, inspect, search, upgrade, back up and restore
galleries."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from app.commands.options import add_device_option, add_gallery_option, add_workers_option
from model.hardware import DECODERS, GRAPH_MODES, PRECISIONS

TILE = 160
CAPTION = 28
# index.vectors.INDEX_TYPES, spelt out so that ``gsp --help`` does not import faiss
INDEX_TYPES = ("auto", "flat", "ivf_fastscan", "ivf_sq8", "ivf", "ivf_flat")


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "index",
        help="build, inspect and search galleries",
        description="Every action names its gallery with --gallery DIR (formerly --out for "
        "build and a first argument for the others, still accepted until the next release).",
    )
    commands = parser.add_subparsers(dest="index_command", metavar="ACTION", required=True)

    build = commands.add_parser("build", help="index every image under a folder (resumable)")
    build.add_argument("--images", required=True, type=Path, help="folder walked recursively")
    build.add_argument("--checkpoint", required=True, type=Path)
    add_gallery_option(build, help_text="gallery directory, created if absent", old_option="--out")
    _add_job_options(build)
    build.add_argument(
        "--index-type",
        default="auto",
        choices=INDEX_TYPES,
        help=(
            "auto: flat (exact) below 100k items, ivf_fastscan up to 20M (ivf_sq8 with a faiss"
            " GPU), ivf (IVF-PQ) beyond"
        ),
    )
    build.add_argument(
        "--labels-from-subfolders",
        action="store_true",
        help="label each image with its first-level subfolder's name",
    )
    build.add_argument(
        "--report", type=Path, help="failures as JSON lines (default: in the gallery directory)"
    )
    build.add_argument(
        "--engine",
        default="inprocess",
        choices=("inprocess", "ray"),
        help="inprocess (default): this process and its loader workers; ray: Ray Data (CPU "
        "decode tasks, a pool of embedding actors) on a local Ray instance or the cluster at "
        "--address (needs the ray extra: pip install 'gsp-retrieval[ray]')",
    )
    build.add_argument(
        "--address",
        help="with --engine ray: the Ray cluster to run on (HOST:PORT, ray://HOST:10001, or auto); "
        "default: a local Ray instance started for the job",
    )
    build.add_argument(
        "--actors",
        default="auto",
        help="with --engine ray: embedding actors (auto: one per GPU of the cluster, else one)",
    )
    build.set_defaults(handler=_build)

    add = commands.add_parser("add", help="add image files or folders to an existing gallery")
    add_gallery_option(add, old_positional=True, positional_list=("images", Path))
    add.add_argument("images", nargs="+", type=Path, metavar="IMAGE", help="files or folders")
    add.add_argument("--checkpoint", required=True, type=Path)
    add.add_argument("--label", help="label for every added image")
    _add_job_options(add)
    add.set_defaults(handler=_add)

    remove = commands.add_parser("remove", help="remove items by id")
    add_gallery_option(remove, old_positional=True, positional_list=("ids", int))
    remove.add_argument("ids", nargs="+", type=int, metavar="ID")
    remove.set_defaults(handler=_remove)

    info = commands.add_parser("info", help="counts, sizes on disk, model fingerprint, index")
    add_gallery_option(info, old_positional=True)
    info.add_argument("--json", action="store_true", help="print JSON instead of text")
    info.set_defaults(handler=_info)

    search = commands.add_parser("search", help="the gallery's nearest images to a query image")
    add_gallery_option(search, old_positional=True)
    search.add_argument("image", type=Path, help="query image file")
    search.add_argument("--checkpoint", required=True, type=Path)
    search.add_argument("-k", type=int, default=10)
    search.add_argument("--label", help="only match items with this label")
    search.add_argument("--contact-sheet", type=Path, help="PNG of query and matches, heatmaps")
    add_device_option(search)
    search.set_defaults(handler=_search)

    upgrade = commands.add_parser(
        "upgrade", help="bring a gallery in an older on-disk format to this version's (resumable)"
    )
    add_gallery_option(upgrade)
    upgrade.set_defaults(handler=_upgrade)

    backup = commands.add_parser(
        "backup", help="copy a gallery consistently, even while it is served and written"
    )
    add_gallery_option(backup, help_text="the gallery to copy")
    backup.add_argument(
        "copy", metavar="DEST", type=Path, help="new or empty directory; the copy is a gallery"
    )
    backup.set_defaults(handler=_backup)

    restore = commands.add_parser("restore", help="copy a backup back into a gallery directory")
    restore.add_argument("copy", metavar="BACKUP", type=Path)
    add_gallery_option(restore, help_text="new or empty directory (see --replace)")
    restore.add_argument(
        "--replace",
        action="store_true",
        help="replace the gallery the directory holds (no process may be writing it)",
    )
    restore.set_defaults(handler=_restore)

    publish = commands.add_parser(
        "publish",
        help="copy a gallery as a new read-only version for api replicas (atomic; see "
        "docs/architecture.md, scaling out)",
    )
    add_gallery_option(publish, help_text="the gallery to publish (it may be served meanwhile)")
    publish.add_argument(
        "destination", metavar="DEST", type=Path, help="new, empty or earlier publication directory"
    )
    publish.add_argument(
        "--every",
        type=float,
        metavar="SECONDS",
        help="keep running: publish again whenever the gallery changed, checking this often",
    )
    publish.set_defaults(handler=_publish)


def _add_job_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--batch-size", type=int, default=64)
    add_workers_option(parser)
    add_device_option(parser)
    parser.add_argument(
        "--precision",
        choices=PRECISIONS,
        default="auto",
        help="the network's arithmetic: auto is fp16 (autocast) on CUDA and fp32 on the CPU; "
        "fp32 everywhere for bit-stable embeddings (default: auto)",
    )
    parser.add_argument(
        "--decode",
        choices=DECODERS,
        default="cpu",
        help="where JPEGs decode: cpu (worker processes) or gpu (nvJPEG, in batches; needs "
        "CUDA; other formats still decode on the CPU) (default: cpu)",
    )
    parser.add_argument(
        "--cuda-graphs",
        choices=GRAPH_MODES,
        default="off",
        help="on CUDA: replay the network as CUDA graphs per bucketed batch size (graphs: "
        "captured; reduce-overhead: torch.compile's); ignored on the CPU (default: off)",
    )
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")


def _fail(message: str) -> int:
    print(f"error: {message}", file=sys.stderr)
    return 1


def _build(args: argparse.Namespace) -> int:
    from index.build import build_gallery
    from index.errors import GalleryError
    from index.ray_job import RayUnavailableError, build_gallery_on_ray

    if args.engine != "ray" and args.address:
        return _fail("--address needs --engine ray")
    if args.engine == "ray" and args.decode != "cpu":
        return _fail("--engine ray decodes in CPU tasks: --decode gpu is for the in-process job")
    if args.engine == "ray" and args.workers != "auto":
        return _fail("--workers sizes the in-process job's loader; Ray runs a decode task per CPU")
    if args.engine != "ray" and args.actors != "auto":
        return _fail("--actors needs --engine ray")
    build, engine_options = (
        (build_gallery_on_ray, {"address": args.address, "actors": args.actors})
        if args.engine == "ray"
        else (build_gallery, {"workers": args.workers, "decode": args.decode})
    )
    try:
        report = build(
            args.images,
            args.checkpoint,
            args.gallery,
            batch_size=args.batch_size,
            device=args.device,
            precision=args.precision,
            graphs=args.cuda_graphs,
            index_type=args.index_type,
            report_path=args.report,
            labels_from_subfolders=args.labels_from_subfolders,
            progress=not args.no_progress,
            **engine_options,
        )
    except (GalleryError, OSError, ValueError, RayUnavailableError) as error:
        return _fail(str(error))
    print(report.summary())
    return 0


def _add(args: argparse.Namespace) -> int:
    from index.build import FAILURES_FILE, index_files, open_for_model
    from index.errors import GalleryError
    from index.images import find_images
    from model.checkpoint import load_checkpoint

    files: list[tuple[Path, str | None]] = []
    for path in args.images:
        if path.is_dir():
            files.extend((found, args.label) for found in find_images(path))
        elif path.is_file():
            files.append((path, args.label))
        else:
            return _fail(f"{path} is neither a file nor a folder")
    try:
        loaded = load_checkpoint(args.checkpoint, device="cpu")
        with open_for_model(args.gallery, loaded) as gallery:
            report = index_files(
                gallery,
                loaded,
                files,
                batch_size=args.batch_size,
                workers=args.workers,
                device=args.device,
                precision=args.precision,
                decode=args.decode,
                graphs=args.cuda_graphs,
                failures_path=args.gallery / FAILURES_FILE,
                progress=not args.no_progress,
            )
    except (GalleryError, OSError, ValueError) as error:
        return _fail(str(error))
    print(report.summary())
    return 0


def _remove(args: argparse.Namespace) -> int:
    from index.errors import GalleryError
    from index.gallery import Gallery

    try:
        with Gallery.open(args.gallery) as gallery:
            removed = gallery.remove(args.ids)
            gallery.save()
            remaining = len(gallery)
    except GalleryError as error:
        return _fail(str(error))
    print(f"removed {removed} of {len(args.ids)} ids; gallery holds {remaining} items")
    return 0


def _disk_usage(directory: Path) -> dict[str, int]:
    sizes: dict[str, int] = {}
    for path in directory.rglob("*"):
        if path.is_file() and not path.is_symlink():
            top = path.relative_to(directory).parts[0]
            sizes[top] = sizes.get(top, 0) + path.stat().st_size
    return sizes


def _info(args: argparse.Namespace) -> int:
    from index.errors import GalleryError
    from index.format import FORMAT_VERSION, upgrade_command
    from index.gallery import Gallery

    try:
        with Gallery.open(args.gallery, read_only=True) as gallery:
            manifest = gallery.manifest
            labels = gallery.labels()
    except GalleryError as error:
        return _fail(str(error))
    sizes = _disk_usage(args.gallery)
    info: dict[str, Any] = {
        "items": manifest.count,
        "labels": {str(k): v for k, v in labels.items() if k is not None},
        "unlabelled": labels.get(None, 0),
        "model_fingerprint": manifest.model_fingerprint,
        "preprocessing": manifest.preprocessing,
        "embedding_dim": manifest.embedding_dim,
        "metric": manifest.metric,
        "index_type": manifest.index_type,
        "requested_index_type": manifest.requested_index_type,
        "index_params": manifest.index_params,
        "bytes_on_disk": sizes,
        "total_bytes": sum(sizes.values()),
        "created_at": manifest.created_at,
        "updated_at": manifest.updated_at,
        "format_version": manifest.format_version,
    }
    if manifest.format_version < FORMAT_VERSION:
        info["upgrade_command"] = upgrade_command(args.gallery)
    if args.json:
        print(json.dumps(info, indent=2))
    else:
        for key, value in info.items():
            print(f"{key:22} {value}")
    return 0


def _upgrade(args: argparse.Namespace) -> int:
    from index.errors import GalleryError
    from index.upgrade import upgrade_gallery

    try:
        report = upgrade_gallery(args.gallery)
    except (GalleryError, OSError) as error:
        return _fail(str(error))
    print(report.summary())
    return 0


def _backup(args: argparse.Namespace) -> int:
    return _copy(args.gallery, args.copy, replace=False)


def _restore(args: argparse.Namespace) -> int:
    return _copy(args.copy, args.gallery, replace=args.replace)


def _copy(source: Path, target: Path, *, replace: bool) -> int:
    """``backup`` and ``restore``: the same consistent copy, in opposite directions."""
    from index.backup import copy_gallery
    from index.errors import GalleryError

    try:
        report = copy_gallery(source, target, replace=replace)
    except (GalleryError, OSError) as error:
        return _fail(str(error))
    print(report.summary())
    return 0


def _publish(args: argparse.Namespace) -> int:
    import time

    from index.errors import GalleryError
    from index.publish import gallery_changes, publish_gallery

    if args.every is not None and args.every <= 0:
        return _fail(f"--every must be positive, got {args.every}")
    published = None
    while True:
        seen = gallery_changes(args.gallery)
        if seen != published:
            try:
                report = publish_gallery(args.gallery, args.destination)
            except (GalleryError, OSError) as error:
                if args.every is None:
                    return _fail(str(error))
                print(f"error: {error} (retrying)", file=sys.stderr, flush=True)
            else:
                print(report.summary(), flush=True)
                published = seen
        if args.every is None:
            return 0
        time.sleep(args.every)


def _search(args: argparse.Namespace) -> int:
    import torch

    from index.build import open_for_model
    from index.errors import GalleryError
    from index.images import decode_image
    from model.checkpoint import load_checkpoint
    from model.hardware import resolve_device
    from model.transforms import eval_transform

    if args.k <= 0:
        return _fail(f"-k must be positive, got {args.k}")
    try:
        loaded = load_checkpoint(args.checkpoint, device="cpu")
        preprocessing = loaded.config.preprocessing
        query = decode_image(args.image.read_bytes(), preprocessing.resize_size)
        device = resolve_device(args.device)
        with torch.inference_mode():
            net = loaded.net.to(device).eval()
            output = net(eval_transform(preprocessing)(query)[None].to(device))
        with open_for_model(args.gallery, loaded, read_only=True) as gallery:
            matches = gallery.search(output.embedding.float().cpu().numpy(), args.k, args.label)[0]
            records = {r.id: r for r in gallery.get_many([m.id for m in matches])}
    except (GalleryError, OSError, ValueError) as error:
        return _fail(str(error))
    print(f"{'rank':>4}  {'score':>7}  {'id':>8}  {'label':<16}  source")
    for match in matches:
        record = records[match.id]
        label = record.label or "-"
        print(f"{match.rank:>4}  {match.score:7.4f}  {match.id:>8}  {label:<16}  {record.source}")
    if args.contact_sheet:
        query_weights = output.weights[0].float().cpu().numpy()
        tiles = [(query, query_weights, "query")]
        for match in matches:
            record = records[match.id]
            caption = match_caption(match.rank, match.score, record.label)
            tiles.append((_open_source(record.source), record.weights, caption))
        _contact_sheet(tiles).save(args.contact_sheet)
        print(f"contact sheet written to {args.contact_sheet}")
    return 0


def match_caption(rank: int, score: float, label: str | None) -> str:
    """A contact-sheet tile's caption: rank, the score to 4 decimals (near-duplicate scores of a
    collapsed model still differ there) and the label, so matches can be told apart."""
    shown = label or "(no label)"
    if len(shown) > 14:  # the tile is 160 px wide
        shown = shown[:12] + ".."
    return f"#{rank}  {score:.4f}  {shown}"


def _open_source(source: str) -> Any:
    """The indexed image when its file is still there, else a grey placeholder."""
    from PIL import Image

    try:
        with Image.open(source) as image:
            image.seek(0)
            return image.convert("RGB")
    except (OSError, ValueError):
        return Image.new("RGB", (TILE, TILE), (128, 128, 128))


def _contact_sheet(tiles: list[tuple[Any, Any, str]]) -> Any:
    """One row per five tiles: each image with its weights heatmap and a caption."""
    from PIL import Image, ImageDraw, ImageOps

    from app.heatmap import overlay_heatmap
    from model.transforms import to_rgb

    columns = min(5, len(tiles))
    rows = -(-len(tiles) // columns)
    sheet = Image.new("RGB", (columns * TILE, rows * (TILE + CAPTION)), (255, 255, 255))
    draw = ImageDraw.Draw(sheet)
    for position, (image, weights, caption) in enumerate(tiles):
        square = ImageOps.fit(to_rgb(image), (TILE, TILE))
        x, y = (position % columns) * TILE, (position // columns) * (TILE + CAPTION)
        sheet.paste(overlay_heatmap(square, weights), (x, y))
        draw.text((x + 4, y + TILE + 6), caption, fill=(0, 0, 0))
    return sheet
