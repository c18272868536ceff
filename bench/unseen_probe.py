"""How well can *anything* on the frozen features tell where an unseen object is?

A location probe: a small MLP scores every location of a collage's backbone map from its feature
and its difference to the collage's mean feature; it is trained, with the *true object masks* of
the training collages (which no head of bench/unseen.py sees), to put a softmax over locations on
the object cell.  Read on the validation collages (classes it never saw), its object share is an
optimistic bound on what a pooling head can learn of "where" from these features; pooling the raw
backbone maps with its weights shows what that "where" is worth for retrieval, beside the
untrained backbone and the oracle.  Validation only.

    .venv/bin/python bench/unseen_probe.py [--protocol NAME] [--epochs 40]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from torch import Tensor, nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
import unseen
import unseen_data
import unseen_protocols as P


def location_inputs(maps: Tensor) -> Tensor:
    """``(N, h*w, 2C)``: each location's feature and its difference to the map's mean."""
    flat = maps.float().flatten(2).transpose(1, 2)
    return torch.cat([flat, flat - flat.mean(dim=1, keepdim=True)], dim=2)


class _Standardise(nn.Module):
    def __init__(self, mean: Tensor, std: Tensor) -> None:
        super().__init__()
        self.register_buffer("mean", mean)
        self.register_buffer("std", std)

    def forward(self, x: Tensor) -> Tensor:
        return (x - self.mean) / self.std


def train_probe(inputs: Tensor, masks: Tensor, epochs: int, seed: int) -> nn.Module:
    """An MLP whose softmax over locations is fitted to the normalised ``masks`` ``(N, h*w)``."""
    torch.manual_seed(seed)
    flat = inputs.reshape(-1, inputs.shape[-1])
    mean, std = flat.mean(dim=0), flat.std(dim=0) + 1e-3
    probe = nn.Sequential(
        nn.Dropout(0.3), nn.Linear(inputs.shape[-1], 256), nn.ReLU(), nn.Linear(256, 1)
    )
    model = nn.Sequential(_Standardise(mean, std), probe)
    optimizer = torch.optim.Adam(probe.parameters(), lr=1e-3, weight_decay=1e-3)
    wanted = masks / masks.sum(dim=1, keepdim=True)
    model.train()
    for _ in range(epochs):
        order = torch.randperm(inputs.shape[0])
        for start in range(0, len(order), 64):
            batch = order[start : start + 64]
            logits = model(inputs[batch]).squeeze(-1)
            loss = -(wanted[batch] * logits.log_softmax(dim=1)).sum(dim=1).mean()
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    return model.eval()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--protocol", choices=sorted(P.PROTOCOLS), default=P.DEFAULT)
    parser.add_argument("--epochs", type=int, default=40)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    protocol = P.use(args.protocol)
    torch.set_num_threads(2)
    data = unseen_data.load()
    size = protocol.map_size
    masks = {
        split: unseen.object_masks(data[f"{split}_position"], size).flatten(1).float()
        for split in ("train", "val")
    }
    probe = train_probe(location_inputs(data["train_maps"]), masks["train"], args.epochs, args.seed)
    print(
        f"protocol {protocol.name} {protocol.digest()}; uniform share {protocol.uniform_share:.3f}"
    )
    with torch.no_grad():
        for split in ("train", "val"):
            scores = probe(location_inputs(data[f"{split}_maps"])).squeeze(-1)
            share = float((scores.softmax(dim=1) * masks[split]).sum(dim=1).mean())
            cells = size // protocol.grid
            top = scores.topk(cells * cells, dim=1).indices
            hits = float(masks[split].gather(1, top).mean())
            print(
                f"{split}: probe's object share {share:.3f}, top locations on the object {hits:.3f}"
            )
        maps = data["val_maps"].float().flatten(2).transpose(1, 2)
        weights = probe(location_inputs(data["val_maps"])).squeeze(-1).softmax(dim=1)
        rows = {
            "untrained backbone GAP": maps.mean(dim=1),
            "probe-weighted backbone": (weights[..., None] * maps).sum(dim=1),
            "oracle (object cell)": (masks["val"][..., None] * maps).sum(dim=1),
        }
    print("| val instance retrieval | P@1 | MAP@R |\n| --- | --- | --- |")
    for name, embeddings in rows.items():
        measured = unseen.measures(embeddings, data["val_instance"])
        print(f"| {name} | {measured['P@1']:.1f} | {measured['MAP@R']:.1f} |")


if __name__ == "__main__":
    main()
