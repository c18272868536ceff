"""CUDA graphs against the eager forward: the GSP layer alone and the whole embedding network,
side by side in one run, to choose ``GSP_CUDA_GRAPHS`` (model/graphs.py) by measurement.

For each batch size: the median time of the eager forward, of ``graphs`` (captured
torch.cuda.CUDAGraph per bucket) and ``reduce-overhead`` (torch.compile's CUDA graphs), their
ratio to eager, and the largest difference of their embeddings and weights from eager float32
(the exactness the tests assert). The layer is also timed against its floor, the projection
and cost matrix alone (the issue's ratio, target <= 1.5x), and one query's embed + exact search
over a 10k gallery against the 3 ms target. On a CPU the graph modes are off and only eager is
timed (a smoke run of the script).

    python3 bench/graphs.py --device cuda [--backbone resnet50] [--batches 1,8,16]
"""

from __future__ import annotations

import argparse
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from model.config import ModelConfig  # noqa: E402
from model.graphs import GRAPH_MODES, BucketedForward, GraphMode  # noqa: E402
from model.net import EmbeddingOutput, build_embedding_net  # noqa: E402

_MODES: tuple[GraphMode, ...] = tuple(mode for mode in GRAPH_MODES if mode != "off")


def timed_ms(function: Callable[[], object], device: torch.device, repeats: int) -> float:
    """Median milliseconds of ``function`` (synchronised), after three warm-up calls."""
    for _ in range(3):
        function()
    samples = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        function()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        samples.append((time.perf_counter() - start) * 1000.0)
    return statistics.median(samples)


def largest_difference(got: EmbeddingOutput, want: EmbeddingOutput) -> float:
    return max(
        float((got.embedding - want.embedding).abs().max()),
        float((got.weights - want.weights).abs().max()),
    )


def compare(
    name: str,
    forward: Callable[[torch.Tensor], EmbeddingOutput],
    batch: torch.Tensor,
    device: torch.device,
    repeats: int,
) -> None:
    """One line: eager and every graph mode on ``batch``."""
    eager_out = forward(batch)
    eager = timed_ms(lambda: forward(batch), device, repeats)
    line = f"{name:<34} eager {eager:8.3f} ms"
    for mode in _MODES:
        graphed = BucketedForward(forward, device, mode)
        if graphed.mode == "off":
            continue
        difference = largest_difference(graphed(batch), eager_out)
        ms = timed_ms(lambda g=graphed: g(batch), device, repeats)  # type: ignore[misc]
        line += f" | {mode} {ms:8.3f} ms ({ms / eager:.2f}x, max diff {difference:.1e})"
    print(line, flush=True)


def layer_rows(
    net: torch.nn.Module, device: torch.device, batches: list[int], repeats: int
) -> None:
    """The GSP layer alone on backbone-sized feature maps, and its floor."""
    pooling = net.pooling
    channels = pooling.in_channels

    def pool(features: torch.Tensor) -> EmbeddingOutput:
        return net.pool(features)

    def floor(features: torch.Tensor) -> torch.Tensor:
        projected = pooling.projection(features).flatten(2)
        return torch.einsum("bdn,md->bmn", projected, pooling.prototypes)

    for side in (7, 14):
        for batch in batches:
            features = torch.randn(batch, channels, side, side, device=device)
            reference = timed_ms(lambda f=features: floor(f), device, repeats)  # type: ignore[misc]
            print(f"  projection + cost matrix, n={side * side}, B={batch}: {reference:.3f} ms")
            compare(f"GSP layer n={side * side} B={batch}", pool, features, device, repeats)


def embed_and_search(net: torch.nn.Module, device: torch.device, size: int, repeats: int) -> None:
    """One query: forward through the fastest path, then exact search over 10k items."""
    import faiss
    import numpy as np

    index = faiss.IndexFlatIP(net.embedding_dim)
    gallery = np.random.default_rng(0).standard_normal((10_000, net.embedding_dim))
    gallery /= np.linalg.norm(gallery, axis=1, keepdims=True)
    index.add(gallery.astype(np.float32))
    query = torch.randn(1, 3, size, size, device=device)
    for mode in ("off", *_MODES):
        forward = BucketedForward(net, device, mode)
        if mode != "off" and forward.mode == "off":
            continue

        def one(f: BucketedForward = forward) -> None:
            embedding = f(query).embedding.cpu().numpy()
            index.search(embedding, 10)

        print(f"embed + search (10k, k=10), {mode}: {timed_ms(one, device, repeats):.3f} ms")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda", choices=["cpu", "cuda"])
    parser.add_argument("--backbone", default="resnet50")
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--batches", default="1,8,16")
    parser.add_argument("--repeats", type=int, default=30)
    args = parser.parse_args()
    device = torch.device(args.device)
    batches = [int(value) for value in args.batches.split(",")]
    commit = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True
    ).stdout.strip()
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor()
    print(f"machine: {name or platform.machine()}, torch {torch.__version__}; commit {commit}")
    torch.manual_seed(0)
    config = ModelConfig(backbone=args.backbone, pretrained=False, embedding_dim=512)
    net = build_embedding_net(config).to(device).eval()
    print(f"model: {args.backbone} GSP (random weights), {args.image_size} px, float32")
    with torch.inference_mode():
        layer_rows(net, device, batches, args.repeats)
        for batch in batches:
            images = torch.randn(batch, 3, args.image_size, args.image_size, device=device)
            compare(f"whole forward B={batch}", net, images, device, args.repeats)
        embed_and_search(net, device, args.image_size, args.repeats)
    return 0


if __name__ == "__main__":
    sys.exit(main())
