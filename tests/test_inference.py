"""The inference path the bulk job and the service share (model/inference.py): the same input
as the reference transform, precision handling, one pinned tensor per batch, decoders that agree
with each other, and bulk-indexed files that embed as the service embeds them."""

from __future__ import annotations

import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from bench.bulk import photo_like
from index.build import _collate, _FileDataset, build_gallery, index_files, open_or_create
from index.gallery import Gallery
from model.checkpoint import load_checkpoint
from model.config import ModelConfig, Preprocessing
from model.hardware import GraphMode
from model.inference import Embedder, decode_jpegs, resolve_precision, stack_crops
from model.net import EmbeddingNet, build_embedding_net
from model.transforms import eval_crop, eval_transform, to_uint8_tensor

CPU = torch.device("cpu")


def write_photos(folder: Path, count: int, size: tuple[int, int] = (800, 600)) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for seed in range(count):
        path = folder / f"{seed:03d}.jpg"
        path.write_bytes(photo_like(seed, size))
        paths.append(path)
    return paths


def tiny_net(checkpoint: Path) -> tuple[EmbeddingNet, Preprocessing]:
    """A fresh copy of the indexing tests' tiny model and its preprocessing."""
    loaded = load_checkpoint(checkpoint)
    return loaded.net.eval(), loaded.config.preprocessing


def cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.sum(a * b, axis=1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)


def test_the_embedders_input_is_the_reference_transforms_bit_for_bit(
    tmp_path: Path, checkpoint: Path
) -> None:
    net, preprocessing = tiny_net(checkpoint)
    embedder = Embedder(net, preprocessing, CPU, "fp32")
    images = [Image.open(path).convert("RGB") for path in write_photos(tmp_path, 3)]
    crop = eval_crop(preprocessing)
    batch = stack_crops([to_uint8_tensor(crop(image)) for image in images])
    reference = torch.stack([eval_transform(preprocessing)(image) for image in images])
    assert torch.equal(embedder.inputs(batch), reference)


def test_precision_names() -> None:
    assert resolve_precision("auto", CPU) is torch.float32
    assert resolve_precision("auto", torch.device("cuda")) is torch.float16
    assert resolve_precision("bf16", CPU) is torch.bfloat16
    with pytest.raises(ValueError, match="fp16 needs a CUDA device"):
        resolve_precision("fp16", CPU)
    with pytest.raises(ValueError, match="precision must be one of auto, fp32, fp16, bf16"):
        resolve_precision("half", CPU)


def test_bf16_autocast_runs_the_backbone_in_bf16_and_returns_float32(
    tmp_path: Path, checkpoint: Path
) -> None:
    net, preprocessing = tiny_net(checkpoint)
    seen: list[torch.dtype] = []
    net.backbone.register_forward_hook(lambda module, args, out: seen.append(out.dtype))
    crop = eval_crop(preprocessing)
    paths = write_photos(tmp_path, 4)
    batch = stack_crops([to_uint8_tensor(crop(Image.open(path).convert("RGB"))) for path in paths])
    exact = Embedder(net, preprocessing, CPU, "fp32")(batch)
    mixed = Embedder(net, preprocessing, CPU, "bf16")(batch)
    assert seen == [torch.float32, torch.bfloat16]
    assert mixed.embedding.dtype == mixed.weights.dtype == torch.float32
    torch.testing.assert_close(mixed.embedding.norm(dim=1), torch.ones(4))
    assert (cosines(mixed.embedding.numpy(), exact.embedding.numpy()) > 0.98).all()


def test_a_loader_batch_holds_one_tensor_so_it_is_pinned_once(
    tmp_path: Path, checkpoint: Path
) -> None:
    """DataLoader pins every tensor a batch holds: per-sample tensors left in the batch were
    the 4,032 pin_memory calls of issue 19."""
    paths = write_photos(tmp_path, 5, size=(120, 90))
    (tmp_path / "bad.jpg").write_bytes(b"not a jpeg")
    preprocessing = load_checkpoint(checkpoint).config.preprocessing
    dataset = _FileDataset(
        [(p, None) for p in [*paths, tmp_path / "bad.jpg"]], frozenset(), preprocessing
    )
    batch = _collate([dataset[i] for i in range(len(dataset))])

    def tensors(value: object) -> int:
        if isinstance(value, torch.Tensor):
            return 1
        if isinstance(value, dict):
            return sum(tensors(v) for v in value.values())
        if isinstance(value, list | tuple):
            return sum(tensors(v) for v in value)
        return 0

    assert tensors(batch) == 1
    assert batch["crops"].shape == (5, 64, 64, 3) and batch["crops"].dtype == torch.uint8
    assert len(batch["ok"]) == 5 and len(batch["failed"]) == 1


def test_jpegs_decoded_as_tensors_agree_with_the_pillow_path(
    tmp_path: Path, checkpoint: Path
) -> None:
    """The GPU decoder's code (nvJPEG there; libjpeg here, same resize and crop) against the
    workers' reduced-scale Pillow decode: the pixels differ a little, the embeddings not."""
    from index.images import decode_image

    net, preprocessing = tiny_net(checkpoint)
    embedder = Embedder(net, preprocessing, CPU, "fp32")
    files = [path.read_bytes() for path in write_photos(tmp_path, 6)]
    files += [photo_like(9, (4000, 3000))]
    crop = eval_crop(preprocessing)
    pillow = stack_crops([to_uint8_tensor(crop(decode_image(data, 72))) for data in files])
    decoded = decode_jpegs(files, preprocessing, CPU)
    assert all(image is not None for image in decoded)
    tensors = stack_crops([image for image in decoded if image is not None])
    assert tensors.shape == pillow.shape and tensors.dtype == torch.uint8
    assert (tensors.float() - pillow.float()).abs().mean() < 3
    agree = cosines(embedder(tensors).embedding.numpy(), embedder(pillow).embedding.numpy())
    assert agree.min() >= 0.999, agree


def test_a_jpeg_the_tensor_decoder_refuses_is_none_and_the_rest_still_decode(
    checkpoint: Path,
) -> None:
    _, preprocessing = tiny_net(checkpoint)
    good = photo_like(0, (160, 120))
    garbage = b"\xff\xd8\xff" + bytes(200)
    decoded = decode_jpegs([good, garbage, good[: len(good) // 3], good], preprocessing, CPU)
    assert [image is None for image in decoded] == [False, True, True, False]
    first, last = decoded[0], decoded[3]
    assert first is not None and last is not None and torch.equal(first, last)


def test_decoding_on_the_gpu_needs_cuda(tmp_path: Path, checkpoint: Path) -> None:
    loaded = load_checkpoint(checkpoint)
    gallery = open_or_create(tmp_path / "gallery", loaded)
    with pytest.raises(ValueError, match="decode 'gpu' needs a CUDA device"):
        index_files(
            gallery, loaded, [], device="cpu", decode="gpu", failures_path=tmp_path / "f.jsonl"
        )
    gallery.close()


def indexed_and_served(
    tmp_path: Path, checkpoint: Path, device: str, decode: str, graphs: GraphMode = "off"
) -> tuple[np.ndarray, np.ndarray]:
    """Embeddings of the same photos as the bulk job stored them and as the service embeds
    the files (its upload decoder, its engine), in file order; both forwards run as
    ``graphs`` says (CUDA graphs or eager)."""
    from app.service.images import decode_file
    from app.service.inference import InferenceEngine

    paths = write_photos(tmp_path / "photos", 6)
    paths.append(tmp_path / "photos" / "large.jpg")
    paths[-1].write_bytes(photo_like(7, (4000, 3000)))
    build_gallery(
        tmp_path / "photos", checkpoint, tmp_path / "gallery", device=device, decode=decode,
        batch_size=4, workers=1, graphs=graphs, progress=False,
    )  # fmt: skip
    engine = InferenceEngine(
        checkpoint, torch.device(device), max_batch_size=4, max_wait_ms=0, graphs=graphs
    )
    with Gallery.open(tmp_path / "gallery", read_only=True) as gallery:
        stored = []
        for path in paths:
            found = gallery.find_sha256(decode_file(path, max_pixels=10**8).sha256)
            assert found is not None
            stored.append(gallery.embedding(found))
    tensors = [
        engine.prepare(decode_file(path, max_pixels=10**8, min_side=engine.min_side).image)
        for path in paths
    ]
    served = [embedded.embedding for embedded in engine.embed_tensors(tensors)]
    return np.stack(stored), np.stack(served)


def test_a_bulk_indexed_file_embeds_as_the_service_embeds_it(
    tmp_path: Path, checkpoint: Path
) -> None:
    stored, served = indexed_and_served(tmp_path, checkpoint, "cpu", "cpu")
    assert cosines(stored, served).min() >= 0.999


@pytest.mark.gpu
@pytest.mark.parametrize("graphs", ["off", "graphs"])
@pytest.mark.parametrize("decode", ["cpu", "gpu"])
def test_on_cuda_bulk_and_service_agree_whatever_decodes(
    tmp_path: Path, checkpoint: Path, decode: str, graphs: GraphMode
) -> None:
    stored, served = indexed_and_served(tmp_path, checkpoint, "cuda", decode, graphs)
    assert cosines(stored, served).min() >= 0.999


def cifar_photos(archive: Path, count: int) -> list[bytes]:
    """The first ``count`` CIFAR-10 test JPEGs, as files."""
    files = []
    with tarfile.open(archive, "r:gz") as tar:
        for member in tar:
            if member.isfile() and member.name.startswith("cifar10/test/"):
                extracted = tar.extractfile(member)
                assert extracted is not None
                files.append(extracted.read())
                if len(files) == count:
                    break
    return files


@pytest.mark.gpu
def test_fp16_on_cuda_matches_fp32_on_a_real_gallery(cifar_archive: Path) -> None:
    """ImageNet EfficientNet-Lite0 + GSP on 1,000 real photos: every embedding within cosine
    0.999 of its fp32 twin, and each item's 10 nearest neighbours 95 % the same."""
    from index.images import decode_image
    from model.backbones import default_preprocessing

    config = ModelConfig(
        backbone="efficientnet_lite0",
        pretrained=True,
        preprocessing=default_preprocessing("efficientnet_lite0"),
    )
    torch.manual_seed(0)
    net = build_embedding_net(config).eval()
    crop = eval_crop(config.preprocessing)
    side = config.preprocessing.resize_size
    crops = [
        to_uint8_tensor(crop(decode_image(f, side))) for f in cifar_photos(cifar_archive, 1000)
    ]
    cuda = torch.device("cuda")
    runs = {}
    for precision in ("fp32", "fp16"):
        embedder = Embedder(net, config.preprocessing, cuda, precision)
        runs[precision] = torch.cat(
            [embedder(stack_crops(crops[i : i + 128])).embedding for i in range(0, 1000, 128)]
        )
    exact, half = runs["fp32"], runs["fp16"]
    assert (exact * half).sum(dim=1).min() >= 0.999
    neighbours = [(e @ e.T).topk(11, dim=1).indices[:, 1:].cpu().numpy() for e in (exact, half)]
    overlap = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(*neighbours, strict=True)])
    assert overlap >= 0.95, overlap
