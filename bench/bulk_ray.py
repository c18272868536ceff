"""The Ray job against the in-process job on the same folder, with Ray's start-up apart
(issue 19: on this CPU box the Ray job >= 0.8 of the in-process job).

    .venv/bin/python -m bench.bulk_ray                  # 800x600 JPEGs, resnet50 GSP at 224
    .venv/bin/python -m bench.bulk_ray --images 128 --backbone resnet18 --rounds 3

Printed: the local Ray instance's start (``ray.init``: the head's processes), one Ray job over
a few files (what each job pays before the first image: the actors' processes, the network
through the object store), then the two jobs alternated ``--rounds`` times on the same folder
of ``bench.bulk``'s photo-like files (fresh gallery each time; alternating spreads the load of a
shared machine over both), images/s each and the ratio of their medians. The jobs' own
figures include everything inside the job, so the Ray job's per-job start-up is in them.
"""

from __future__ import annotations

import argparse
import statistics
import time

from bench.bulk import CACHE, bench_config, machine, photo_folder, run_job


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=256, help="800x600 JPEGs")
    parser.add_argument("--backbone", default="resnet50")
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()

    import ray

    from index.build import build_gallery
    from index.ray_job import build_gallery_on_ray
    from model.checkpoint import save_checkpoint
    from model.hardware import usable_cpus
    from model.net import build_embedding_net

    CACHE.mkdir(parents=True, exist_ok=True)
    print(f"machine: {machine()}, ray {ray.__version__}", flush=True)
    config = bench_config(args.backbone, args.image_size)
    checkpoint = CACHE / f"ckpt-{args.backbone}-{args.image_size}"
    save_checkpoint(checkpoint, build_embedding_net(config).eval(), config)
    folder = photo_folder("800x600", args.images)
    few = photo_folder("800x600", 8)
    options = {"batch_size": args.batch_size, "device": "cpu", "precision": "fp32"}

    started = time.perf_counter()
    ray.init(num_cpus=usable_cpus(), include_dashboard=False, log_to_driver=False)
    print(f"Ray start-up (ray.init, local instance): {time.perf_counter() - started:.1f} s")
    rate, _ = run_job(build_gallery_on_ray, few, checkpoint, **options)
    print(f"Ray job over 8 files (actors' start-up and pipeline set-up): {8 / rate:.1f} s")

    jobs = {"in-process": build_gallery, "ray": build_gallery_on_ray}
    rates: dict[str, list[float]] = {name: [] for name in jobs}
    print(f"\n{args.images} files of 800x600, {args.backbone} GSP at {args.image_size}, fp32")
    print("| round | in-process (images/s) | ray (images/s) |")
    print("| --- | --- | --- |")
    for number in range(1, args.rounds + 1):
        for name, build in jobs.items():
            # (run_job's CPU time counts this process and its children, not Ray's workers)
            rates[name].append(run_job(build, folder, checkpoint, **options)[0])
        print(f"| {number} | {rates['in-process'][-1]:.2f} | {rates['ray'][-1]:.2f} |", flush=True)
    local, on_ray = (statistics.median(rates[name]) for name in jobs)
    print(f"Ray / in-process (medians): {on_ray / local:.3f} (target >= 0.8)")
    ray.shutdown()


if __name__ == "__main__":
    main()
