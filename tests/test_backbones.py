"""Backbones: shapes, strides, weight loading from local files only, and real ImageNet weights."""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision
from PIL import Image
from safetensors.torch import save_file

import model.backbones as backbones
from model.backbones import (
    BACKBONES,
    PretrainedWeightsError,
    build_backbone,
    default_preprocessing,
    efficientnet_lite0_classifier,
)
from model.config import Preprocessing

CHANNELS = {"resnet18": 512, "resnet50": 2048, "efficientnet_lite0": 1280}

# CIFAR-10 class -> ImageNet-1k class indices that show that class and nothing else.  Deer is
# left out: ImageNet has no deer class (only antelopes and the like).  Pickup trucks are left
# out of both vehicle classes, as CIFAR-10 itself excludes them.
CIFAR_TO_IMAGENET = {
    "airplane": [404, 895, 908],  # airliner, warplane, wing
    # beach wagon, cab, convertible, jeep, limousine, minivan, Model T, racer, sports car
    "automobile": [436, 468, 511, 609, 627, 656, 661, 751, 817],
    # cock ... great grey owl, black grouse ... black swan, white stork ... albatross
    "bird": [*range(7, 25), *range(80, 101), *range(127, 147)],
    "cat": [*range(281, 286)],  # tabby, tiger cat, Persian, Siamese, Egyptian cat
    "dog": [*range(151, 269)],  # Chihuahua ... Mexican hairless: every dog breed
    "frog": [30, 31, 32],  # bullfrog, tree frog, tailed frog
    "horse": [339, 603],  # sorrel, horse cart
    # aircraft carrier, canoe, catamaran, container ship, fireboat, gondola, lifeboat, liner,
    # pirate ship, schooner, speedboat, submarine, trimaran, wreck, yawl
    "ship": [403, 472, 484, 510, 554, 576, 625, 628, 724, 780, 814, 833, 871, 913, 914],
    # fire engine, garbage truck, moving van, police van, tow truck, trailer truck
    "truck": [555, 569, 675, 734, 864, 867],
}
PHOTOS_PER_CLASS = 22
# Measured 0.47, 0.49 and 0.58 on three disjoint sets of 22 test photos per class; predicting
# without looking at the image scores 1/9 = 0.11.
MIN_ACCURACY = 0.35


def read_cifar_test_photos(archive: Path, per_class: int) -> dict[str, list[Image.Image]]:
    """The first ``per_class`` test photos of every mapped class, read from the tar stream."""
    photos: dict[str, list[Image.Image]] = {name: [] for name in CIFAR_TO_IMAGENET}
    with tarfile.open(archive, "r:gz") as tar:
        for member in tar:
            parts = member.name.split("/")
            if len(parts) == 4 and parts[1] == "test" and member.isfile():
                bucket = photos.get(parts[2])
                if bucket is not None and len(bucket) < per_class:
                    data = tar.extractfile(member).read()
                    bucket.append(Image.open(io.BytesIO(data)).convert("RGB"))
            if all(len(bucket) == per_class for bucket in photos.values()):
                return photos
    raise AssertionError(f"{archive} holds fewer than {per_class} test photos of some class")


def to_input(photos: list[Image.Image], preprocessing: Preprocessing) -> torch.Tensor:
    """Upscale whole 32 px thumbnails to the input size (no crop: the object fills the frame)."""
    size = (preprocessing.image_size, preprocessing.image_size)
    pixels = np.stack([np.asarray(photo.resize(size, Image.BICUBIC)) for photo in photos])
    images = torch.from_numpy(pixels).permute(0, 3, 1, 2).float() / 255
    mean = torch.tensor(preprocessing.mean).reshape(1, 3, 1, 1)
    std = torch.tensor(preprocessing.std).reshape(1, 3, 1, 1)
    return (images - mean) / std


@pytest.fixture(scope="module")
def lite0_classifier() -> torch.nn.Module:
    return efficientnet_lite0_classifier().eval()


@pytest.mark.slow
def test_efficientnet_lite0_weights_classify_real_photos(
    cifar_archive: Path, lite0_classifier: torch.nn.Module
) -> None:
    photos = read_cifar_test_photos(cifar_archive, PHOTOS_PER_CLASS)
    names = list(CIFAR_TO_IMAGENET)
    preprocessing = default_preprocessing("efficientnet_lite0")
    correct = 0
    with torch.no_grad():
        for label, name in enumerate(names):
            logits = lite0_classifier(to_input(photos[name], preprocessing))
            probabilities = logits.softmax(dim=1)
            per_class = torch.stack(
                [probabilities[:, CIFAR_TO_IMAGENET[n]].max(dim=1).values for n in names], dim=1
            )
            correct += int((per_class.argmax(dim=1) == label).sum())
    accuracy = correct / (len(names) * PHOTOS_PER_CLASS)
    print(f"EfficientNet-Lite0 CIFAR-10 accuracy via ImageNet classes: {accuracy:.3f}")
    assert accuracy > MIN_ACCURACY, f"accuracy {accuracy:.3f} on {len(names)} classes"


def test_pretrained_efficientnet_backbone_is_the_classifier_without_head(
    lite0_classifier: torch.nn.Module,
) -> None:
    images = torch.randn(2, 3, 64, 64)
    backbone = build_backbone("efficientnet_lite0", pretrained=True).eval()
    with torch.no_grad():
        torch.testing.assert_close(backbone(images), lite0_classifier.forward_features(images))


@pytest.mark.parametrize("name", BACKBONES)
def test_feature_map_shapes_and_stride(name: str) -> None:
    images = torch.randn(2, 3, 64, 64)
    coarse = build_backbone(name, pretrained=False).eval()
    fine = build_backbone(name, pretrained=False, output_stride=16).eval()
    fine.load_state_dict(coarse.state_dict())  # dilation changes no parameter shape
    with torch.no_grad():
        coarse_map, fine_map = coarse(images), fine(images)
    assert coarse.out_channels == fine.out_channels == CHANNELS[name]
    assert coarse_map.shape == (2, CHANNELS[name], 2, 2)
    assert fine_map.shape == (2, CHANNELS[name], 4, 4)


def test_resnet50_dilation_matches_torchvision() -> None:
    reference = torchvision.models.resnet50(replace_stride_with_dilation=[False, False, True])
    reference_features = torch.nn.Sequential(*list(reference.children())[:-2]).eval()
    backbone = build_backbone("resnet50", pretrained=False, output_stride=16).eval()
    state = reference.state_dict()
    backbone.load_state_dict({k: v for k, v in state.items() if not k.startswith("fc.")})
    images = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(backbone(images), reference_features(images))


def test_unknown_names_and_strides_are_refused() -> None:
    with pytest.raises(ValueError, match="unknown backbone 'vgg16'"):
        build_backbone("vgg16", pretrained=False)
    with pytest.raises(ValueError, match="unknown backbone"):
        default_preprocessing("vgg16")
    with pytest.raises(ValueError, match="output_stride"):
        build_backbone("resnet18", pretrained=False, output_stride=8)


def test_preprocessing_follows_each_weights_release() -> None:
    assert default_preprocessing("resnet50") == Preprocessing(224, 232)
    assert default_preprocessing("resnet18") == Preprocessing(224, 256)
    lite = default_preprocessing("efficientnet_lite0")
    assert (lite.mean, lite.std) == ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))


def test_missing_torchvision_weights_explain_what_to_do(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    with pytest.raises(PretrainedWeightsError) as caught:
        build_backbone("resnet50", pretrained=True)
    message = str(caught.value)
    assert str(tmp_path / "hub" / "checkpoints" / "resnet50-11ad3fa6.pth") in message
    assert "pretrained=False" in message and "pretrained='/path/to/" in message


def test_torchvision_weights_come_from_the_hub_cache(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))

    def no_download(*args: object, **kwargs: object) -> None:
        raise AssertionError("tried to download weights")

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", no_download)
    monkeypatch.setattr(torch.hub, "download_url_to_file", no_download)
    reference = torchvision.models.resnet18()
    cache = tmp_path / "hub" / "checkpoints"
    cache.mkdir(parents=True)
    torch.save(reference.state_dict(), cache / "resnet18-f37072fd.pth")
    backbone = build_backbone("resnet18", pretrained=True)
    assert torch.equal(backbone.layer4[1].conv2.weight, reference.layer4[1].conv2.weight)


def test_local_weights_files(tmp_path: Path) -> None:
    reference = build_backbone("resnet18", pretrained=False)
    path = tmp_path / "resnet18.safetensors"
    save_file({k: v.contiguous() for k, v in reference.state_dict().items()}, str(path))
    loaded = build_backbone("resnet18", pretrained=str(path))
    assert torch.equal(loaded.conv1.weight, reference.conv1.weight)

    with pytest.raises(ValueError, match="do not fit the model"):
        build_backbone("resnet50", pretrained=path)
    with pytest.raises(PretrainedWeightsError, match="does not exist"):
        build_backbone("resnet18", pretrained=tmp_path / "absent.pth")
    pickled = tmp_path / "object.pth"
    torch.save({"conv1.weight": Path("not a tensor")}, pickled)
    with pytest.raises(ValueError, match="weights-only"):
        build_backbone("resnet18", pretrained=pickled)


def test_shipped_weights_are_mapped_with_every_shape_checked(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    shipped = torch.load(backbones._shipped_lite0_file(), map_location="cpu", weights_only=True)
    assert len(shipped) == 296
    keys = list(shipped)
    broken = dict(shipped)
    broken[keys[10]] = broken[keys[10]][:-1]
    path = tmp_path / "broken.pth"
    torch.save(broken, path)
    monkeypatch.setattr(backbones, "_shipped_lite0_file", lambda: path)
    with pytest.raises(ValueError, match=f"tensor 10 of .*{keys[10]}"):
        build_backbone("efficientnet_lite0", pretrained=True)
    del broken[keys[10]]
    torch.save(broken, path)
    with pytest.raises(ValueError, match="holds 295 tensors, the model expects 296"):
        build_backbone("efficientnet_lite0", pretrained=True)
