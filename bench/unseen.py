"""Class-disjoint comparison: random, untrained backbone, oracle, trained GAP and trained GSP.

On the cached frozen EfficientNet-Lite0 features of bench/unseen_data.py (protocols in
bench/unseen_protocols.py), trains a GAP head and a GSP head per seed with the same recipe and
prints, side by side for each protocol, mean ± sd over seeds of P@1 and MAP@R (percent), the
effective dimension of the embeddings (participation ratio of their covariance spectrum), their
mean pairwise cosine and the share of pooling weight on the object's cell (uniform: 1/9):

- ``instance``: instance retrieval in clutter on classes never trained on (heads trained on
  instance labels of the training classes);
- ``collage``: class retrieval of collages of unseen classes (heads trained on class labels);
- ``real``: the instance heads on plain CIFAR-10 test photos of the classes they never saw
  (224 px, no crop: what the demo model meets), retrieved by class; with ``--split test`` only.

``--split val`` (the default) reports on the validation classes, carved from the training side:
choose settings there.  ``--split test`` reads the test classes; run it once with the chosen
recipe.  The recipe's knobs are the flags below; their defaults are the recipe chosen on val
(docs/benchmarks.md).

    .venv/bin/python bench/unseen.py [--split val|test] [--seeds 0 1 2] [--epochs N] ...
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
import unseen_data
import unseen_protocols as P

from model.evaluate import retrieval_metrics
from model.gsp import GeneralizedSumPooling, GlobalAveragePooling
from model.losses import build_loss

UNIFORM_SHARE = 1 / (P.GRID * P.GRID)


# -- measures --------------------------------------------------------------------------------


def effective_dimension(embeddings: Tensor) -> float:
    """Participation ratio ``(sum l)^2 / sum l^2`` of the covariance eigenvalues ``l``."""
    centred = embeddings.double() - embeddings.double().mean(dim=0)
    eigenvalues = torch.linalg.eigvalsh(centred.T @ centred / centred.shape[0]).clamp_min(0)
    return float(eigenvalues.sum() ** 2 / (eigenvalues**2).sum())


def mean_pairwise_cosine(embeddings: Tensor) -> float:
    """Mean cosine over distinct pairs."""
    unit = F.normalize(embeddings.double(), dim=1)
    n = unit.shape[0]
    total = unit.sum(dim=0).pow(2).sum() - n  # sum over i != j of cos(i, j)
    return float(total / (n * (n - 1)))


def object_masks(positions: Tensor, size: int) -> Tensor:
    """``(N, size, size)`` masks of the locations on each collage's object cell."""
    per_cell = size // P.GRID
    rows, cols = positions // P.GRID, positions % P.GRID
    index = torch.arange(size)
    on_row = (index[None, :] // per_cell) == rows[:, None]
    on_col = (index[None, :] // per_cell) == cols[:, None]
    return on_row[:, :, None] & on_col[:, None, :]


def object_share(weights: Tensor, positions: Tensor) -> float:
    """Mean share of each image's pooling weight on its object cell (the cells tile the map)."""
    masks = object_masks(positions, weights.shape[-1]).double()
    return float(
        ((weights.double() * masks).sum(dim=(1, 2)) / weights.double().sum(dim=(1, 2))).mean()
    )


def measures(embeddings: Tensor, labels: Tensor) -> dict[str, float]:
    metrics = retrieval_metrics(embeddings, labels)
    return {
        "P@1": 100 * metrics["precision_at_1"],
        "MAP@R": 100 * metrics["map_at_r"],
        "eff dim": effective_dimension(embeddings),
        "cos": mean_pairwise_cosine(embeddings),
    }


# -- heads -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Recipe:
    """How a head is trained; every field is a flag of this script."""

    epochs: int
    lr: float
    lr_prototypes: float
    batch_instances: int
    loss: str
    distill: float
    metric_weight: float
    head_start: bool
    train_projection: bool
    prototypes: int
    mu: float
    entropy_weight: float


def whitened_pca(pooled: Tensor, dim: int) -> tuple[Tensor, Tensor]:
    """``(W, b)`` with ``W x + b`` the top-``dim`` principal components of ``pooled``, whitened."""
    mean = pooled.double().mean(dim=0)
    centred = pooled.double() - mean
    eigenvalues, vectors = torch.linalg.eigh(centred.T @ centred / centred.shape[0])
    top = eigenvalues.argsort(descending=True)[:dim]
    weight = (vectors[:, top] / eigenvalues[top].clamp_min(1e-8).sqrt()).T
    return weight.float(), (-weight @ mean).float()


def build_head(kind: str, recipe: Recipe, train_maps: Tensor, seed: int) -> nn.Module:
    """A GAP or GSP head on 1280-channel maps; ``head_start`` sets its projection to the
    whitened PCA of the training maps' average-pooled features (so it starts as a whitened
    version of the untrained backbone), otherwise PyTorch's default initialisation."""
    torch.manual_seed(seed)
    channels = train_maps.shape[1]
    head: nn.Module
    if kind == "GAP":
        head = GlobalAveragePooling(channels, P.EMBEDDING_DIM)
    else:
        head = GeneralizedSumPooling(
            channels,
            P.EMBEDDING_DIM,
            num_prototypes=recipe.prototypes,
            transport_ratio=recipe.mu,
            entropy_weight=recipe.entropy_weight,
        )
    if recipe.head_start:
        weight, bias = whitened_pca(train_maps.float().mean(dim=(2, 3)), P.EMBEDDING_DIM)
        with torch.no_grad():
            head.projection.weight.copy_(weight[:, :, None, None])
            head.projection.bias.copy_(bias)
    if isinstance(head, GeneralizedSumPooling):
        generator = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            sample = train_maps[torch.randperm(train_maps.shape[0], generator=generator)[:256]]
            projected = head.projection(sample.float()).flatten(2).transpose(1, 2)
            head.init_prototypes(projected.reshape(-1, P.EMBEDDING_DIM), generator)
    return head


def batches(labels: Tensor, per_batch: int, generator: torch.Generator) -> list[Tensor]:
    """One epoch of batches, each ``per_batch`` labels with all their items (instances: 4
    copies; classes: an equal random share of each class, labels interleaved)."""
    groups = [torch.nonzero(labels == value).flatten() for value in labels.unique()]
    if len(groups) >= per_batch:  # instances: whole groups
        order = torch.randperm(len(groups), generator=generator)
        return [
            torch.cat([groups[int(i)] for i in order[start : start + per_batch]])
            for start in range(0, len(order) - per_batch + 1, per_batch)
        ]
    shuffled = [g[torch.randperm(len(g), generator=generator)] for g in groups]  # classes
    take = 96 // len(groups)
    steps = min(len(g) for g in shuffled) // take
    return [torch.cat([g[s * take : (s + 1) * take] for g in shuffled]) for s in range(steps)]


def train_head(
    kind: str,
    recipe: Recipe,
    maps: Tensor,
    labels: Tensor,
    teacher: Tensor,
    seed: int,
) -> nn.Module:
    """Train a head on training maps ``(N, C, h, w)`` with ``labels``; ``teacher`` ``(N, C)`` is
    each collage's clean object, average-pooled by the backbone (the label-free target)."""
    head = build_head(kind, recipe, maps, seed)
    metric = build_loss(recipe.loss, int(labels.max()) + 1, P.EMBEDDING_DIM)
    groups = [
        {"params": [head.projection.weight, head.projection.bias], "lr": recipe.lr},
        {"params": list(metric.parameters()), "lr": recipe.lr},
    ]
    if not recipe.train_projection:
        head.projection.requires_grad_(False)
        groups = groups[1:]
    if isinstance(head, GeneralizedSumPooling):
        groups.append({"params": [head.prototypes], "lr": recipe.lr_prototypes})
    optimizer = torch.optim.Adam([g for g in groups if g["params"]])
    generator = torch.Generator().manual_seed(seed)
    head.train()
    for _ in range(recipe.epochs):
        for index in batches(labels, recipe.batch_instances, generator):
            result = head(maps[index].float())
            embedding = F.normalize(result.embedding, dim=1)
            loss = recipe.metric_weight * metric(embedding, labels[index])
            if recipe.distill:
                projection = head.projection
                target = F.linear(teacher[index], projection.weight.flatten(1), projection.bias)
                cos = (embedding * F.normalize(target.detach(), dim=1)).sum(dim=1)
                loss = loss + recipe.distill * (1 - cos).mean()
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    return head.eval()


def pool(head: nn.Module, maps: Tensor, chunk: int = 256) -> tuple[Tensor, Tensor]:
    """Normalised embeddings and pooling weights of ``maps``."""
    embeddings, weights = [], []
    with torch.no_grad():
        for start in range(0, maps.shape[0], chunk):
            result = head(maps[start : start + chunk].float())
            embeddings.append(F.normalize(result.embedding, dim=1))
            weights.append(result.weights)
    return torch.cat(embeddings), torch.cat(weights)


# -- the comparison --------------------------------------------------------------------------


def first_copies(instances: Tensor) -> Tensor:
    """Index of the first collage of every object photo (the class protocol's items)."""
    seen: set[int] = set()
    keep = []
    for index, instance in enumerate(instances.tolist()):
        if instance not in seen:
            seen.add(instance)
            keep.append(index)
    return torch.tensor(keep)


def untrained(name: str, maps: Tensor, positions: Tensor, seed: int) -> tuple[Tensor, float]:
    """Embeddings and object share of the rows that need no training."""
    if name == "random":
        generator = torch.Generator().manual_seed(seed)
        return torch.randn(maps.shape[0], P.EMBEDDING_DIM, generator=generator), float("nan")
    if name == "backbone GAP":
        return maps.float().mean(dim=(2, 3)), UNIFORM_SHARE
    masks = object_masks(positions, maps.shape[-1])[:, None]  # oracle: the object cell only
    return (maps.float() * masks).sum(dim=(2, 3)) / masks.sum(dim=(2, 3)), 1.0


def run(args: argparse.Namespace) -> None:
    recipe = Recipe(**{field: getattr(args, field) for field in Recipe.__dataclass_fields__})
    data = unseen_data.load()
    split = args.split
    teacher = data["train_clean"][data["train_instance"]]
    eval_maps, positions = data[f"{split}_maps"], data[f"{split}_position"]
    firsts = first_copies(data[f"{split}_instance"])
    protocols: dict[str, Callable[[Tensor], dict[str, float]]] = {
        "instance": lambda e: measures(e, data[f"{split}_instance"]),
        "collage": lambda e: measures(e[firsts], data[f"{split}_label"][firsts]),
    }
    rows: dict[str, dict[str, list[float]]] = {}

    def add(row: str, key: str, value: float) -> None:
        rows.setdefault(row, {}).setdefault(key, []).append(value)

    for seed in args.seeds:
        for name in ("random", "backbone GAP", "oracle (object cell)"):
            embeddings, share = untrained(name, eval_maps, positions, seed)
            for protocol, measure in protocols.items():
                for key, value in measure(embeddings).items():
                    add(name, f"{protocol} {key}", value)
            add(name, "share", share)
            if split == "test" and name != "oracle (object cell)":
                real = untrained(name, data["real_maps"], positions, seed)[0]
                for key, value in measures(real, data["real_label"]).items():
                    add(name, f"real {key}", value)
        for kind in ("GAP", "GSP"):
            started = time.perf_counter()
            instance_head = train_head(
                kind, recipe, data["train_maps"], data["train_instance"], teacher, seed
            )
            embeddings, weights = pool(instance_head, eval_maps)
            for key, value in protocols["instance"](embeddings).items():
                add(f"trained {kind}", f"instance {key}", value)
            add(f"trained {kind}", "share", object_share(weights, positions))
            if split == "test":
                real = pool(instance_head, data["real_maps"])[0]
                for key, value in measures(real, data["real_label"]).items():
                    add(f"trained {kind}", f"real {key}", value)
            class_head = train_head(
                kind, recipe, data["train_maps"], data["train_label"], teacher, seed
            )
            for key, value in protocols["collage"](pool(class_head, eval_maps)[0]).items():
                add(f"trained {kind}", f"collage {key}", value)
            add(f"trained {kind}", "seconds", time.perf_counter() - started)
            summary = rows[f"trained {kind}"]
            print(
                f"seed {seed} {kind}: instance P@1 {summary['instance P@1'][-1]:.1f} "
                f"MAP@R {summary['instance MAP@R'][-1]:.1f} share {summary['share'][-1]:.3f} "
                f"({summary['seconds'][-1]:.0f} s)",
                flush=True,
            )
    report(args, recipe, rows)


def _cell(values: list[float] | None, digits: int) -> str:
    if not values or all(v != v for v in values):
        return "-"
    spread = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.{digits}f} ± {spread:.{digits}f}"


def report(
    args: argparse.Namespace, recipe: Recipe, rows: dict[str, dict[str, list[float]]]
) -> None:
    commit = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"],
        capture_output=True,
        text=True,
        cwd=unseen_data.REPO,
    ).stdout.strip()
    print(
        f"\ncommit {commit}; machine {platform.machine()}, {os.cpu_count()} CPUs, "
        f"load average {os.getloadavg()[0]:.1f}; protocol {P.protocol_digest()}; "
        f"split {args.split}; seeds {args.seeds}\n{recipe}\n"
    )
    tables = {
        "instance in clutter": [
            "instance P@1",
            "instance MAP@R",
            "instance eff dim",
            "instance cos",
            "share",
        ],
        "class-disjoint collage": [
            "collage P@1",
            "collage MAP@R",
            "collage eff dim",
            "collage cos",
        ],
        "real photos of unseen classes": ["real P@1", "real MAP@R", "real eff dim", "real cos"],
    }
    if args.split != "test":
        del tables["real photos of unseen classes"]  # CIFAR-10 test photos: never for choosing
    for title, keys in tables.items():
        print(f"{title} ({args.split}; object share uniform = {UNIFORM_SHARE:.3f})")
        print("| | " + " | ".join(k.split(" ", 1)[-1] for k in keys) + " |")
        print("| --- |" + " --- |" * len(keys))
        for row, values in rows.items():
            cells = [_cell(values.get(k), 3 if k.endswith(("cos", "share")) else 1) for k in keys]
            print(f"| {row} | " + " | ".join(cells) + " |")
        print()


def parse() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--split", choices=["val", "test"], default="val")
    parser.add_argument("--seeds", type=int, nargs="+", default=list(P.SEEDS))
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--lr", type=float, default=1e-4, help="projection (and proxies)")
    parser.add_argument("--lr-prototypes", type=float, default=1e-2)
    parser.add_argument("--batch-instances", type=int, default=32, help="instances per batch")
    parser.add_argument("--loss", default="multi_similarity")
    parser.add_argument(
        "--distill", type=float, default=1.0, help="weight of the clean-object teacher"
    )
    parser.add_argument("--metric-weight", type=float, default=1.0)
    parser.add_argument("--head-start", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--train-projection", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--prototypes", type=int, default=16)
    parser.add_argument("--mu", type=float, default=0.3)
    parser.add_argument("--entropy-weight", type=float, default=5.0)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    return args


if __name__ == "__main__":
    arguments = parse()
    torch.set_num_threads(arguments.threads)
    run(arguments)
