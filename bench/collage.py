"""Collage benchmark: GAP vs GSP heads on frozen EfficientNet-Lite0 features, everything else equal.

CIFAR-10 collages (2x2 grid of 32 px photos, one of a target class, the rest nuisance classes;
1,500 training and 400 test collages per target class) are upscaled to 224 px; the backbone's
1280 x 7 x 7 feature maps are extracted once into the feature cache, then every head (1x1
projection to 128-d, the same loss, batches, schedule and seeds) trains on the cache through the
``gsp train`` job (``model.training.train``).  Reports mean ± standard deviation over seeds of
MAP@R, P@1 and the target-cell mass share (share of pooling weight on the class-bearing cell;
uniform weights give 0.25), measured after the last epoch (no picking of epochs on the test
split), and the seconds per run.

    .venv/bin/python bench/collage.py [--seeds 0 1 2] [--epochs 3] [--variants GAP "GSP mu"]
        [--split test|val] [--set optimizer.lr_pooling=3e-3 ...] [--gsp-set KEY=VALUE ...]
        [--quick]

Settings are chosen on ``--split val`` (collages of train photos that no training collage uses
as its class-bearing photo), then reported on the test split.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
# name, config, overrides: each GSP line changes one hyper-parameter of the tuned GSP head.
VARIANTS: list[tuple[str, str, list[str]]] = [
    ("GAP", "collage_gap.yaml", []),
    ("GSP", "collage_gsp.yaml", []),
    ("GSP ZSR off", "collage_gsp.yaml", ["loss.zsr=false"]),
    ("GSP k-center prototypes", "collage_gsp.yaml", ["prototype_init=kcenter"]),
    ("GSP mu 0.15", "collage_gsp.yaml", ["model.pooling_options.transport_ratio=0.15"]),
    ("GSP mu 0.5", "collage_gsp.yaml", ["model.pooling_options.transport_ratio=0.5"]),
    ("GSP mu 0.3", "collage_gsp.yaml", ["model.pooling_options.transport_ratio=0.3"]),
    ("GSP gamma 5", "collage_gsp.yaml", ["model.pooling_options.entropy_weight=5"]),
]
METRICS = (("map_at_r", "MAP@R"), ("precision_at_1", "P@1"), ("target_mass_share", "mass share"))


def _summary(values: list[float]) -> str:
    spread = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.3f} ± {spread:.3f}"


def _parse() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--variants", nargs="*", help="run only variants named exactly so")
    parser.add_argument(
        "--set", nargs="*", default=[], metavar="KEY=VALUE", help="overrides for every variant"
    )
    parser.add_argument(
        "--gsp-set", nargs="*", default=[], metavar="KEY=VALUE", help="overrides for GSP variants"
    )
    parser.add_argument(
        "--split",
        choices=["test", "val"],
        default="test",
        help="evaluate on the test collages, or on val collages (train photos held out from the "
        "training collages) to choose settings without looking at the test split",
    )
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    parser.add_argument("--quick", action="store_true", help="tiny data set, to check the script")
    return parser.parse_args()


def main() -> None:
    args = _parse()
    from model.training import cache_features, train
    from model.training_config import load_training_config

    torch.set_num_threads(args.threads)
    unknown = set(args.variants or []) - {name for name, _, _ in VARIANTS}
    if unknown:
        raise SystemExit(f"unknown variants {sorted(unknown)}; known: {[v[0] for v in VARIANTS]}")
    common = [
        f"schedule.epochs={args.epochs}",
        f"checkpoint_every={args.epochs}",  # validate once, after the last epoch
        "cache_dir=" + str(REPO / ".cache/features"),
        *args.set,
    ]
    if args.quick:
        common += [
            "data.train.per_class=60",
            "data.val.per_class=20",
            "data.test.per_class=20",
        ]
    began = time.perf_counter()
    cache_features(load_training_config(REPO / "configs/collage_gsp.yaml", common))
    cached = time.perf_counter() - began
    print(f"feature cache ready after {cached:.0f} s", flush=True)

    chosen = [v for v in VARIANTS if not args.variants or v[0] in args.variants]
    rows = []
    with tempfile.TemporaryDirectory(prefix="collage-bench-") as scratch:
        for name, config_file, overrides in chosen:
            per_seed = []
            gsp = args.gsp_set if config_file == "collage_gsp.yaml" else []
            for seed in args.seeds:
                output = Path(scratch) / f"{len(rows)}-{seed}"
                config = load_training_config(
                    REPO / "configs" / config_file,
                    [*common, *gsp, *overrides, f"seed={seed}", f"output_dir={output}"],
                )
                start = time.perf_counter()
                result = train(config, show_progress=False)
                # val: the last epoch's validation; test: the run's one test score (on best/,
                # which with one validation is the last epoch)
                test = result.test["metrics"] if result.test else {}
                last = dict(test if args.split == "test" else result.history[-1]["val"])
                last["seconds"] = time.perf_counter() - start
                per_seed.append(last)
                print(
                    f"{name} seed {seed}: "
                    + ", ".join(f"{label} {last[key]:.3f}" for key, label in METRICS)
                    + f" ({last['seconds']:.0f} s)",
                    flush=True,
                )
            rows.append((name, per_seed))

    elapsed = time.perf_counter() - began
    print(
        f"\nmachine: {platform.machine()} ({platform.processor() or 'cpu'}), "
        f"{os.cpu_count()} CPUs, {torch.get_num_threads()} torch threads, "
        f"load average {os.getloadavg()[0]:.1f}"
    )
    print(
        f"{args.split} split, seeds {args.seeds}, {args.epochs} epochs, "
        f"overrides {args.set or 'none'}, GSP "
        f"overrides {args.gsp_set or 'none'}; feature "
        f"cache {cached / 60:.1f} min, total {elapsed / 60:.1f} min\n"
    )
    print("| head | " + " | ".join(label for _, label in METRICS) + " | s / run |")
    print("| --- |" + " --- |" * (len(METRICS) + 1))
    for name, per_seed in rows:
        cells = [_summary([record[key] for record in per_seed]) for key, _ in METRICS]
        seconds = statistics.mean(record["seconds"] for record in per_seed)
        print(f"| {name} | " + " | ".join(cells) + f" | {seconds:.0f} |")


if __name__ == "__main__":
    main()
