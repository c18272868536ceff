"""Faithfulness of GSP explanations on the CIFAR-10 collage test set (frozen EfficientNet-Lite0).

Trains a GSP head and a GAP head on the cached backbone features (``gsp train`` job, the collage
configs, a few epochs) unless checkpoints are given, then measures on the test collages:

1. Deletion: for query/match pairs (each query's correct rank-1 match), the match's locations
   are removed 10 % at a time (GSP re-pooled over the remaining locations only, same trained
   ratio) in four orders: the match's GSP weights, its GSP location terms of the similarity
   (``model.explain.location_terms``: weight x alignment with the query, summing to the score),
   a Grad-CAM map of the same similarity (channel weights = spatial mean of d similarity /
   d features, ReLU of the weighted sum), and random.  The faster the similarity drops, the
   more the order names what the score rests on: reported as the area under the similarity
   curve (lower is more faithful).
2. Pointing: the share of collages whose heaviest cell is the class-bearing one, and the
   target-cell mass share, for GSP weights and for the Grad-CAM map of the similarity to the
   image's rank-1 neighbour.
3. Region search: queries GAP gets wrong at rank 1 (first half of the test set against the
   second half as gallery); MAP@R and P@1 of GAP, of plain GSP, and of GSP with the
   class-bearing cell marked "favour" (``model.explain.repool_with_regions``); as a control,
   favouring a wrong cell.

    .venv/bin/python bench/faithfulness.py [--epochs 3] [--pairs 200] [--threads 2]
        [--gsp-checkpoint DIR --gap-checkpoint DIR] [--quick]
"""

from __future__ import annotations

import argparse
import os
import platform
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor
from tqdm import tqdm

REPO = Path(__file__).resolve().parents[1]
STEPS = tuple(i / 10 for i in range(10))  # removed fraction; at 100 % nothing is left to pool
CHUNK = 200


def _parse() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=3, help="training epochs per head")
    parser.add_argument("--pairs", type=int, default=200, help="query/match pairs for deletion")
    parser.add_argument("--gsp-checkpoint", type=Path, help="use this GSP head, do not train")
    parser.add_argument("--gap-checkpoint", type=Path, help="use this GAP head, do not train")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help="tiny data set, to check the script")
    return parser.parse_args()


def _config(name: str, args: argparse.Namespace, output: Path):
    from model.training_config import load_training_config

    overrides = [
        f"schedule.epochs={args.epochs}",
        f"checkpoint_every={args.epochs}",
        "cache_dir=" + str(REPO / ".cache/features"),
        f"output_dir={output}",
        f"seed={args.seed}",
    ]
    if args.quick:
        overrides += [
            "data.train.per_class=60",
            "data.val.per_class=20",
            "data.test.per_class=20",
        ]
    return load_training_config(REPO / "configs" / name, overrides)


def _head(name: str, given: Path | None, args: argparse.Namespace, scratch: Path):
    """A trained head: the given checkpoint, or one trained now on the cached features."""
    from model.checkpoint import load_checkpoint
    from model.training import train

    config = _config(name, args, scratch / name)
    if given is None:
        began = time.perf_counter()
        train(config, show_progress=False)
        given = scratch / name / f"epoch-{args.epochs:03d}"
        print(f"trained {name} in {time.perf_counter() - began:.0f} s", flush=True)
    net = load_checkpoint(given).net.eval().requires_grad_(False)
    return net, config


def _pool_all(net, maps: Tensor) -> tuple[Tensor, Tensor]:
    """Unit embeddings and weights of every map (fp16 maps, pooled in float32 chunks)."""
    embeddings, weights = [], []
    with torch.no_grad():
        for start in range(0, len(maps), CHUNK):
            out = net.pool(maps[start : start + CHUNK].float())
            embeddings.append(out.embedding)
            weights.append(out.weights)
    return torch.cat(embeddings), torch.cat(weights)


def gradcam(net, maps: Tensor, targets: Tensor) -> Tensor:
    """Grad-CAM ``(B, h, w)`` of the similarity of each map's embedding to its target vector."""
    cams = []
    for start in range(0, len(maps), CHUNK):
        x = maps[start : start + CHUNK].float().requires_grad_(True)
        with torch.enable_grad():
            similarity = (net.pool(x).embedding * targets[start : start + CHUNK]).sum()
            (grad,) = torch.autograd.grad(similarity, x)
        alpha = grad.mean(dim=(2, 3), keepdim=True)
        cams.append(F.relu((alpha * x.detach()).sum(dim=1)))
    return torch.cat(cams)


def deletion_curves(net, maps: Tensor, queries: Tensor, order: Tensor) -> Tensor:
    """``(P, steps)`` similarity of each query to its match re-pooled without the first
    ``fraction`` of ``order`` (location indices, most important first)."""
    flat = maps.float().flatten(2)  # (P, C, n)
    n = flat.shape[2]
    curves = []
    with torch.no_grad():
        for fraction in STEPS:
            kept = order[:, round(fraction * n) :]
            gathered = flat.gather(2, kept[:, None, :].expand(-1, flat.shape[1], -1))
            embedding = net.pool(gathered[:, :, None, :]).embedding  # a 1 x n' grid of the rest
            curves.append((embedding * queries).sum(dim=1))
    return torch.stack(curves, dim=1)


def _ranked(scores: Tensor, generator: torch.Generator) -> Tensor:
    """Location indices by descending score, ties broken at random."""
    flat = scores.flatten(1)
    shuffle = torch.stack([torch.randperm(flat.shape[1], generator=generator) for _ in flat])
    order = torch.argsort(flat.gather(1, shuffle), dim=1, descending=True, stable=True)
    return shuffle.gather(1, order)


def _area(curves: Tensor) -> float:
    """Mean over pairs of the area under similarity-vs-removed-fraction, per unit of fraction."""
    x = torch.tensor(STEPS, dtype=torch.float64)
    area = torch.trapezoid(curves.double(), x, dim=1) / (x[-1] - x[0])
    return float(area.mean())


def _nearest(embeddings: Tensor) -> Tensor:
    similarity = embeddings @ embeddings.T
    similarity.fill_diagonal_(-float("inf"))
    return similarity.argmax(dim=1)


def pointing(weights: Tensor, collage, crop_fraction: float) -> tuple[float, float]:
    """Share of images whose heaviest cell is the target cell, and the target-cell mass share."""
    from model.data.collage import collage_masks, target_cell_mask
    from model.evaluate import target_mass_share

    grid = collage.grid
    size = tuple(weights.shape[1:])
    cells = torch.stack(
        [target_cell_mask(divmod(c, grid), grid, size, crop_fraction) for c in range(grid**2)]
    ).double()
    mass = torch.einsum("nhw,chw->nc", weights.double(), cells)
    targets = torch.tensor([row * grid + col for row, col in collage.target_cells])
    hits = float((mass.argmax(dim=1) == targets).double().mean())
    return hits, target_mass_share(weights, *collage_masks(collage, size, crop_fraction))


def region_search(gsp, gap, maps, labels, collage, crop_fraction, generator) -> list[tuple]:
    """MAP@R / P@1 rows on the queries GAP gets wrong at rank 1 (even items vs odd items)."""
    from model.data.collage import target_cell_mask
    from model.evaluate import retrieval_metrics
    from model.explain import repool_with_regions

    queries, gallery = torch.arange(0, len(maps), 2), torch.arange(1, len(maps), 2)
    gap_embeddings, _ = _pool_all(gap, maps)
    gsp_embeddings, _ = _pool_all(gsp, maps)
    best = (gap_embeddings[queries] @ gap_embeddings[gallery].T).argmax(dim=1)
    confused = queries[labels[gallery[best]] != labels[queries]]
    size, grid = tuple(maps.shape[2:]), collage.grid

    def favoured(cell_of) -> Tensor:
        rows = []
        for index in tqdm(confused.tolist(), desc="region re-pooling", leave=False):
            mask = target_cell_mask(cell_of(index), grid, size, crop_fraction)
            rows.append(repool_with_regions(gsp, maps[index].float(), favour_mask=mask).embedding)
        return torch.cat(rows)

    def wrong_cell(index: int) -> tuple[int, int]:
        target = collage.target_cells[index]
        others = [divmod(c, grid) for c in range(grid**2) if divmod(c, grid) != tuple(target)]
        return others[int(torch.randint(len(others), (1,), generator=generator))]

    rows = []
    for name, query, reference in [
        ("GAP", gap_embeddings[confused], gap_embeddings[gallery]),
        ("GSP", gsp_embeddings[confused], gsp_embeddings[gallery]),
        ("GSP, favour the class-bearing cell", favoured(lambda i: collage.target_cells[i]), None),
        ("GSP, favour a wrong cell (control)", favoured(wrong_cell), None),
    ]:
        reference = gsp_embeddings[gallery] if reference is None else reference
        metrics = retrieval_metrics(query, labels[confused], reference, labels[gallery])
        rows.append((name, metrics["map_at_r"], metrics["precision_at_1"]))
    return [*rows, ("queries", len(confused), len(queries))]


def main() -> None:
    args = _parse()
    from model.explain import explain_pair, location_terms
    from model.training.inputs import build_eval_inputs

    torch.set_num_threads(args.threads)
    generator = torch.Generator().manual_seed(args.seed)
    began = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="faithfulness-") as scratch:
        gsp, config = _head("collage_gsp.yaml", args.gsp_checkpoint, args, Path(scratch))
        gap, _ = _head("collage_gap.yaml", args.gap_checkpoint, args, Path(scratch))
    inputs = build_eval_inputs(config, gsp, config.data.test or {})
    maps, labels = inputs.query.batch(range(len(inputs.query)))
    collage, crop = inputs.collage, inputs.crop_fraction
    print(f"{len(maps)} test collages, feature maps {tuple(maps.shape[1:])}", flush=True)
    embeddings, weights = _pool_all(gsp, maps)

    # 1. deletion on correct rank-1 pairs (query half against gallery half)
    queries, gallery = torch.arange(0, len(maps), 2), torch.arange(1, len(maps), 2)
    best = gallery[(embeddings[queries] @ embeddings[gallery].T).argmax(dim=1)]
    correct = (labels[best] == labels[queries]).nonzero().flatten()
    chosen = correct[torch.randperm(len(correct), generator=generator)[: args.pairs]]
    query_ids, match_ids = queries[chosen], best[chosen]
    match_maps, query_vectors = maps[match_ids], embeddings[query_ids]
    cam = gradcam(gsp, match_maps, query_vectors)
    n = weights.shape[1] * weights.shape[2]
    terms = torch.stack(
        [location_terms(gsp, m, q) for m, q in zip(match_maps.float(), query_vectors, strict=True)]
    )
    orders = {
        "GSP weights": _ranked(weights[match_ids], generator),
        "GSP location terms (plan-weighted, sum = score)": _ranked(terms, generator),
        "Grad-CAM": _ranked(cam, generator),
        "random": torch.stack([torch.randperm(n, generator=generator) for _ in match_ids]),
    }
    curves = {
        name: deletion_curves(gsp, match_maps, query_vectors, o) for name, o in orders.items()
    }

    explained = [
        explain_pair(gsp, maps[q].float(), m.float(), top=3)
        for q, m in zip(query_ids, match_maps, strict=True)
    ]
    shared = sum(e.shared_share for e in explained) / len(explained)
    top3 = sum(sum(p.share for p in e.top) for e in explained) / len(explained)
    top3_contribution = sum(
        float(e.contributions.topk(3).values.sum()) / e.score for e in explained
    ) / len(explained)
    worst = max(e.decomposition_error for e in explained)

    # 2. pointing: GSP weights vs Grad-CAM of the similarity to the rank-1 neighbour
    neighbour_cam = gradcam(gsp, maps, embeddings[_nearest(embeddings)])
    pointed = {
        "GSP weights": pointing(weights, collage, crop),
        "Grad-CAM (similarity to rank-1 neighbour)": pointing(neighbour_cam, collage, crop),
    }

    # 3. region search on GAP-confusing queries
    searched = region_search(gsp, gap, maps, labels, collage, crop, generator)
    elapsed = time.perf_counter() - began

    print(
        f"\nmachine: {platform.machine()} ({platform.processor() or 'cpu'}), "
        f"{os.cpu_count()} CPUs, "
        f"{torch.get_num_threads()} torch threads, load average {os.getloadavg()[0]:.1f}; "
        f"torch {torch.__version__}; elapsed {elapsed / 60:.1f} min"
    )
    start = float(next(iter(curves.values()))[:, 0].mean())
    print(f"\nDeletion, {len(chosen)} correct rank-1 pairs, similarity {start:.3f} before removal")
    print("| removal order | " + " | ".join(f"{int(s * 100)} %" for s in STEPS) + " | AUC |")
    print("| --- |" + " --- |" * (len(STEPS) + 1))
    for name, curve in curves.items():
        means = " | ".join(f"{float(v):.3f}" for v in curve.mean(dim=0))
        print(f"| {name} | {means} | {_area(curve):.3f} |")
    print(
        f"\nDecomposition on the same pairs: same-prototype terms carry {shared:.1%} of the "
        f"score, the top 3 of them {top3:.1%}; the 3 prototypes with the largest contributions "
        f"(half the terms through each side) {top3_contribution:.1%}; largest |sum of terms - "
        f"score| {worst:.1e}"
    )
    print(f"\nPointing, {len(maps)} test collages (uniform weights: 0.25 mass share)")
    print("| map | heaviest cell is the target | target-cell mass share |")
    print("| --- | --- | --- |")
    for name, (hits, share) in pointed.items():
        print(f"| {name} | {hits:.3f} | {share:.3f} |")
    (_, confused, total) = searched[-1]
    print(f"\nRegion search, {confused} of {total} queries that GAP gets wrong at rank 1")
    print("| embedding of the query | MAP@R | P@1 |")
    print("| --- | --- | --- |")
    for name, map_at_r, precision in searched[:-1]:
        print(f"| {name} | {map_at_r:.3f} | {precision:.3f} |")


if __name__ == "__main__":
    main()
