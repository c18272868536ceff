"""Class-disjoint comparison: random, untrained backbone, oracle, trained GAP and trained GSP.

On the cached frozen EfficientNet-Lite0 features of bench/unseen_data.py (protocols in
bench/unseen_protocols.py), trains a GAP head and a GSP head per seed with the same recipe and
prints, side by side for each protocol, mean ± sd over seeds of P@1 and MAP@R (percent), the
effective dimension of the embeddings (participation ratio of their covariance spectrum), their
mean pairwise cosine and the share of pooling weight on the object's cell (uniform: 1/9):

- ``instance``: instance retrieval in clutter on classes never trained on (heads trained on
  instance labels of the training classes);
- ``collage``: class retrieval of collages of unseen classes, by heads trained on the training
  classes' labels ("trained GAP") and by the instance heads ("trained GAP on instances");
- ``real``: the instance heads on plain CIFAR-10 test photos of the classes they never saw
  (224 px, no crop: what the demo model meets), retrieved by class; with ``--split test`` only.

``--split val`` (the default) reports on the validation classes, carved from the training side:
choose settings there.  ``--split test`` reads the test classes; run it once with the chosen
recipe.  The recipe's knobs are the flags below; their defaults are the recipe chosen on the
validation classes of the ``--protocol`` (``CHOSEN_RECIPES``, docs/benchmarks.md).

    .venv/bin/python bench/unseen.py [--protocol NAME] [--split val|test] [--seeds 0 1 2] ...
"""

from __future__ import annotations

import argparse
import dataclasses
import json
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
from model.projection_init import principal_projection

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
    grid = P.current().grid
    per_cell = size // grid
    rows, cols = positions // grid, positions % grid
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
#
# Both heads start from the whitened PCA of the training collages' average-pooled backbone
# features (the "head start": at step 0 the GAP head is a whitened untrained backbone).  The GAP
# head then trains its projection; since a 1x1 projection commutes with the mean, it trains on the
# pre-pooled features, the same maths 36x cheaper.  The GSP head keeps that projection frozen and
# trains its prototypes, i.e. where to pool: on frozen projected maps, computed once.


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
    prototypes: int
    mu: float
    entropy_weight: float
    start: str = "whitened"
    start_from: str = "collages"  # or "clean": the training photos alone
    start_dim: int = 0  # 0: the protocol's embedding size
    lr_gsp_projection: float = 0.0
    plan_teacher: float = 0.0
    plan_temperature: float = 0.05
    prototype_init: str = "kcenter"


def spherical_kmeans(
    points: Tensor, k: int, generator: torch.Generator, iterations: int = 20
) -> Tensor:
    """``k`` unit centres of the L2-normalised ``points`` ``(N, d)`` by spherical k-means
    (Lloyd on cosine), started from ``k`` random points; an empty cluster keeps its centre."""
    unit = F.normalize(points.float(), dim=1)
    centres = unit[torch.randperm(unit.shape[0], generator=generator)[:k]].clone()
    for _ in range(iterations):
        assignment = (unit @ centres.T).argmax(dim=1)
        sums = torch.zeros_like(centres).index_add_(0, assignment, unit)
        counts = torch.bincount(assignment, minlength=k)
        centres = torch.where(counts[:, None] > 0, F.normalize(sums, dim=1), centres)
    return centres


def teacher_location_targets(maps: Tensor, clean: Tensor, temperature: float) -> Tensor:
    """``(N, h, w)`` label-free pooling targets: the softmax over locations of the cosine between
    each location's backbone feature and the clean object's average-pooled feature, divided by
    ``temperature``."""
    cosines = torch.cat(
        [
            F.cosine_similarity(
                maps[i : i + 200].float(), clean[i : i + 200].float()[:, :, None, None], dim=1
            )
            for i in range(0, maps.shape[0], 200)
        ]
    )
    return torch.softmax(cosines.flatten(1) / temperature, dim=1).reshape(cosines.shape)


@dataclass
class Inputs:
    """The training side of a run: labels, the teacher, and the maps in both heads' forms."""

    labels: Tensor
    teacher: Tensor  # (N, C) the clean object, average-pooled by the backbone
    pooled: Tensor  # (N, C, 1, 1) average-pooled maps: the GAP head's input
    projected: Tensor  # (N, d, h, w) maps through the frozen head start: the GSP head's input
    location_targets: Tensor | None = None  # (N, h, w) the teacher's pooling targets


def project(maps: Tensor, weight: Tensor, bias: Tensor, chunk: int = 200) -> Tensor:
    """``W x + b`` at every location of ``(N, C, h, w)`` maps, float32."""
    return torch.cat(
        [
            torch.einsum("dc,nchw->ndhw", weight, maps[i : i + chunk].float())
            + bias[None, :, None, None]
            for i in range(0, maps.shape[0], chunk)
        ]
    )


def batches(labels: Tensor, per_batch: int, generator: torch.Generator) -> list[Tensor]:
    """One epoch of batches: ``per_batch`` whole instances (4 copies each), or for class labels
    an equal random share of each class."""
    groups = [torch.nonzero(labels == value).flatten() for value in labels.unique()]
    if len(groups) >= per_batch:  # instances: whole groups
        order = torch.randperm(len(groups), generator=generator)
        return [
            torch.cat([groups[int(i)] for i in order[start : start + per_batch]])
            for start in range(0, len(order) - per_batch + 1, per_batch)
        ]
    shuffled = [g[torch.randperm(len(g), generator=generator)] for g in groups]  # classes
    take = 4 * per_batch // len(groups)
    steps = min(len(g) for g in shuffled) // take
    return [torch.cat([g[s * take : (s + 1) * take] for g in shuffled]) for s in range(steps)]


def train_head(
    kind: str, recipe: Recipe, inputs: Inputs, start: tuple[Tensor, Tensor], seed: int
) -> nn.Module:
    """A GAP or GSP head trained from the head start ``(W, b)``: metric loss on ``labels`` plus
    ``distill`` x (1 - cosine to the head's own embedding of the clean object)."""
    torch.manual_seed(seed)
    weight, bias = start
    dim = weight.shape[0]
    head: nn.Module
    if kind == "GAP":
        head = GlobalAveragePooling(weight.shape[1], dim)
        with torch.no_grad():
            head.projection.weight.copy_(weight[:, :, None, None])
            head.projection.bias.copy_(bias)
        maps = inputs.pooled
        trained: list[dict[str, object]] = [{"params": list(head.parameters())}]
    else:
        head = GeneralizedSumPooling(dim, dim, recipe.prototypes, recipe.mu, recipe.entropy_weight)
        with torch.no_grad():
            head.projection.weight.copy_(torch.eye(dim)[:, :, None, None])
            head.projection.bias.zero_()
            generator = torch.Generator().manual_seed(seed)
            sample = inputs.projected[torch.randperm(len(inputs.labels), generator=generator)[:256]]
            locations = sample.flatten(2).transpose(1, 2).reshape(-1, dim)
            if recipe.prototype_init == "kmeans":
                head.prototypes.copy_(spherical_kmeans(locations, recipe.prototypes, generator))
            else:
                head.init_prototypes(locations, generator)
        maps = inputs.projected
        trained = [{"params": [head.prototypes]}]
        if recipe.lr_gsp_projection > 0:
            projection = list(head.projection.parameters())
            trained.append({"params": projection, "lr": recipe.lr_gsp_projection})
        else:
            head.projection.requires_grad_(False)
    metric = build_loss(recipe.loss, int(inputs.labels.max()) + 1, dim)
    lr = recipe.lr if kind == "GAP" else recipe.lr_prototypes
    optimizer = torch.optim.Adam([*trained, {"params": list(metric.parameters())}], lr=lr)
    generator = torch.Generator().manual_seed(seed)
    teacher_start = F.linear(inputs.teacher, weight, bias)
    fixed_targets = F.normalize(teacher_start, dim=1)
    head.train()
    for _ in range(recipe.epochs):
        for index in batches(inputs.labels, recipe.batch_instances, generator):
            result = head(maps[index])
            embedding = F.normalize(result.embedding, dim=1)
            loss = recipe.metric_weight * metric(embedding, inputs.labels[index])
            if recipe.distill:
                if kind == "GAP" or recipe.lr_gsp_projection > 0:
                    projection = head.projection
                    source = inputs.teacher if kind == "GAP" else teacher_start
                    target = F.linear(source[index], projection.weight.flatten(1), projection.bias)
                    target = F.normalize(target.detach(), dim=1)
                else:
                    target = fixed_targets[index]
                loss = loss + recipe.distill * (1 - (embedding * target).sum(dim=1)).mean()
            if recipe.plan_teacher and kind == "GSP":
                assert inputs.location_targets is not None
                share = result.weights.flatten(1)
                share = share / share.sum(dim=1, keepdim=True).clamp_min(1e-12)
                wanted = inputs.location_targets[index].flatten(1)
                cross_entropy = -(wanted * share.clamp_min(1e-12).log()).sum(dim=1).mean()
                loss = loss + recipe.plan_teacher * cross_entropy
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    return head.eval()


def full_head(head: nn.Module, start: tuple[Tensor, Tensor]) -> nn.Module:
    """The trained head on raw backbone maps: a GSP head's projection (identity unless trained)
    composed with the head start (the same function, one 1x1 convolution); a GAP head as it is."""
    if not isinstance(head, GeneralizedSumPooling):
        return head
    weight, bias = start
    full = GeneralizedSumPooling(
        weight.shape[1],
        weight.shape[0],
        head.num_prototypes,
        head.transport_ratio,
        head.entropy_weight,
    )
    inner_weight, inner_bias = head.projection.weight.flatten(1), head.projection.bias
    with torch.no_grad():
        full.projection.weight.copy_((inner_weight @ weight)[:, :, None, None])
        full.projection.bias.copy_(inner_weight @ bias + inner_bias)
        full.prototypes.copy_(head.prototypes)
    return full.eval()


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
        dim = P.current().embedding_dim
        return torch.randn(maps.shape[0], dim, generator=generator), float("nan")
    if name == "backbone GAP":
        return maps.float().mean(dim=(2, 3)), P.current().uniform_share
    masks = object_masks(positions, maps.shape[-1])[:, None]  # oracle: the object cell only
    return (maps.float() * masks).sum(dim=(2, 3)) / masks.sum(dim=(2, 3)), 1.0


def recipe_of(args: argparse.Namespace) -> Recipe:
    return Recipe(**{field: getattr(args, field) for field in Recipe.__dataclass_fields__})


def head_start(data: dict[str, Tensor], recipe: Recipe) -> tuple[Tensor, Tensor]:
    """Whitened (``recipe.start`` "whitened") or plain ("plain") PCA of the average-pooled
    backbone features of the training collages (``start_from`` "collages") or of the training
    photos alone ("clean": what a head for plain photos should keep), ``start_dim`` wide."""
    if recipe.start_from == "clean":
        pooled = data["train_clean"].float()
    else:
        pooled = data["train_maps"].float().mean(dim=(2, 3))
    dim = recipe.start_dim or P.current().embedding_dim
    return principal_projection(pooled, dim, whiten=recipe.start == "whitened")


def training_inputs(
    data: dict[str, Tensor],
    start: tuple[Tensor, Tensor],
    labels: str,
    recipe: Recipe | None = None,
) -> Inputs:
    """``labels``: "instance" (instance protocol) or "label" (class protocol); the teacher's
    pooling targets only where ``recipe`` asks for them."""
    maps = data["train_maps"]
    teacher = data["train_clean"][data["train_instance"]]
    targets = None
    if recipe is not None and recipe.plan_teacher:
        targets = teacher_location_targets(maps, teacher, recipe.plan_temperature)
    return Inputs(
        labels=data[f"train_{labels}"],
        teacher=teacher,
        pooled=maps.float().mean(dim=(2, 3), keepdim=True),
        projected=project(maps, *start),
        location_targets=targets,
    )


def head_inputs(maps: Tensor, start: tuple[Tensor, Tensor]) -> dict[str, Tensor]:
    """Evaluation maps in each trained head's input form (see :class:`Inputs`)."""
    return {"GAP": maps.float().mean(dim=(2, 3), keepdim=True), "GSP": project(maps, *start)}


def run(args: argparse.Namespace) -> None:
    recipe = recipe_of(args)
    data = unseen_data.load()
    split = args.split
    start = head_start(data, recipe)
    train_sets = {
        name: training_inputs(data, start, name, recipe) for name in ("instance", "label")
    }
    evaluated = head_inputs(data[f"{split}_maps"], start)
    real_inputs = head_inputs(data["real_maps"], start) if split == "test" else {}
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
            instance_head = train_head(kind, recipe, train_sets["instance"], start, seed)
            embeddings, weights = pool(instance_head, evaluated[kind])
            for key, value in protocols["instance"](embeddings).items():
                add(f"trained {kind}", f"instance {key}", value)
            # the instance head also retrieves unseen classes: copies of one photo are a label
            # that exists for any collection, and it teaches more than 5 class labels
            for key, value in protocols["collage"](embeddings).items():
                add(f"trained {kind} on instances", f"collage {key}", value)
            # GAP weighs every location 1 (its input here is pre-pooled): the uniform share
            share = object_share(weights, positions) if kind == "GSP" else P.current().uniform_share
            add(f"trained {kind}", "share", share)
            if split == "test":
                real = pool(instance_head, real_inputs[kind])[0]
                for key, value in measures(real, data["real_label"]).items():
                    add(f"trained {kind}", f"real {key}", value)
            class_head = train_head(kind, recipe, train_sets["label"], start, seed)
            for key, value in protocols["collage"](pool(class_head, evaluated[kind])[0]).items():
                add(f"trained {kind}", f"collage {key}", value)
            add(f"trained {kind}", "seconds", time.perf_counter() - started)
            summary = rows[f"trained {kind}"]
            print(
                f"seed {seed} {kind}: instance P@1 {summary['instance P@1'][-1]:.1f} "
                f"MAP@R {summary['instance MAP@R'][-1]:.1f} share {summary['share'][-1]:.3f} "
                f"({summary['seconds'][-1]:.0f} s)",
                flush=True,
            )
    if args.json is not None:
        record = {"protocol": args.protocol, "recipe": dataclasses.asdict(recipe), "rows": rows}
        args.json.write_text(json.dumps(record))
    report(args, recipe, rows)


def merge(args: argparse.Namespace) -> None:
    """One report from the ``--json`` files of runs of the same recipe (e.g. one seed each, run
    side by side): their per-seed values are pooled."""
    runs = [json.loads(path.read_text()) for path in args.merge]
    wanted = (runs[0]["recipe"], args.protocol)
    if any((run["recipe"], run.get("protocol")) != wanted for run in runs):
        raise SystemExit("--merge needs runs of one recipe on the --protocol given")
    rows: dict[str, dict[str, list[float]]] = {}
    for run_record in runs:
        for row, values in run_record["rows"].items():
            for key, series in values.items():
                rows.setdefault(row, {}).setdefault(key, []).extend(series)
    report(args, Recipe(**runs[0]["recipe"]), rows)


def mean_spread(values: list[float] | None, digits: int) -> str:
    """``mean ± sd`` of ``values`` (sd 0 for one value); ``-`` when none is a number."""
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
        f"load average {os.getloadavg()[0]:.1f}; "
        f"protocol {P.current().name} {P.current().digest()}; "
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
        print(f"{title} ({args.split}; object share uniform = {P.current().uniform_share:.3f})")
        print("| | " + " | ".join(k.split(" ", 1)[-1] for k in keys) + " |")
        print("| --- |" + " --- |" * len(keys))
        for row, values in rows.items():
            if not any(k in values for k in keys):
                continue
            cells = [
                mean_spread(values.get(k), 3 if k.endswith(("cos", "share")) else 1) for k in keys
            ]
            print(f"| {row} | " + " | ".join(cells) + " |")
        print()


# The recipe chosen on each protocol's validation classes (docs/benchmarks.md): what differs from
# the flags' own defaults, which are the first protocol's recipe.
CHOSEN_RECIPES: dict[str, dict[str, object]] = {
    "objects": {},
    "textures": {
        "epochs": 30,
        "lr": 1e-2,
        "distill": 0.0,
        "mu": 0.05,
        "lr_gsp_projection": 1e-4,
    },
}


def parse_defaults(protocol: str = P.DEFAULT) -> argparse.Namespace:
    """The flags' defaults: the recipe chosen on validation for ``protocol``."""
    return build_parser(protocol).parse_args(["--protocol", protocol])


def build_parser(protocol: str | None = None) -> argparse.ArgumentParser:
    """The command line; its recipe defaults are those chosen for ``protocol`` (by default the
    ``--protocol`` named on the command line, else :data:`unseen_protocols.DEFAULT`)."""
    if protocol is None:
        first = argparse.ArgumentParser(add_help=False)
        first.add_argument("--protocol", choices=sorted(P.PROTOCOLS), default=P.DEFAULT)
        protocol = first.parse_known_args()[0].protocol
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--split", choices=["val", "test"], default="val")
    parser.add_argument("--protocol", choices=sorted(P.PROTOCOLS), default=P.DEFAULT)
    parser.add_argument("--seeds", type=int, nargs="+", default=list(P.current().seeds))
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--lr", type=float, default=1e-4, help="projection (and proxies)")
    parser.add_argument("--lr-prototypes", type=float, default=1e-2)
    parser.add_argument("--batch-instances", type=int, default=32, help="instances per batch")
    parser.add_argument("--loss", default="multi_similarity")
    parser.add_argument(
        "--distill", type=float, default=1.0, help="weight of the clean-object teacher"
    )
    parser.add_argument("--metric-weight", type=float, default=1.0)
    parser.add_argument("--prototypes", type=int, default=16)
    parser.add_argument("--mu", type=float, default=0.1)
    parser.add_argument("--entropy-weight", type=float, default=30.0)
    parser.add_argument(
        "--start", choices=["whitened", "plain"], default="whitened", help="the heads' PCA start"
    )
    parser.add_argument("--start-from", choices=["collages", "clean"], default="collages")
    parser.add_argument("--start-dim", type=int, default=0, help="0: the embedding size")
    parser.add_argument(
        "--lr-gsp-projection", type=float, default=0.0, help="GSP trains its projection (0: frozen)"
    )
    parser.add_argument(
        "--plan-teacher",
        type=float,
        default=0.0,
        help="weight of the label-free pooling target: cross-entropy of GSP's weights to the "
        "softmax over locations of cos(location, clean object) / --plan-temperature",
    )
    parser.add_argument("--plan-temperature", type=float, default=0.05)
    parser.add_argument("--prototype-init", choices=["kcenter", "kmeans"], default="kcenter")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", type=Path, help="also write the per-seed values to this file")
    parser.add_argument(
        "--merge", type=Path, nargs="+", metavar="JSON", help="report the pooled --json files"
    )
    parser.set_defaults(**CHOSEN_RECIPES[protocol])
    return parser


def parse() -> argparse.Namespace:
    """The command line, with its ``--protocol`` put in use."""
    args = build_parser().parse_args()
    P.use(args.protocol)
    return args


if __name__ == "__main__":
    arguments = parse()
    torch.set_num_threads(arguments.threads)
    if arguments.merge:
        merge(arguments)
    else:
        run(arguments)
