"""Backbone encoders by name (a small timm-style registry).

Each factory returns an ``nn.Module`` mapping images ``(B, C, H, W)`` to features
``(B, num_features)`` and sets ``num_features`` on it; :func:`create_encoder` also records
the family's projector depth on it (:func:`projector_depth`). Nothing downloads weights:
every encoder starts from random initialisation, as self-supervised pretraining does.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from torch import nn

__all__ = ["DEFAULT_PROJECTOR_LAYERS", "MAX_IMG_SIZE", "MAX_NATIVE_SIZE", "EncoderSpec",
           "check_img_size", "create_encoder", "encoder_spec", "fit_img_size", "list_encoders",
           "projector_depth", "register_encoder"]

MAX_NATIVE_SIZE = 224  # a data set's native size is used up to this (the ImageNet recipes')
MAX_IMG_SIZE = 4096  # larger inputs are a mistake (a ViT-S at 4096 px has 65,536 tokens)
# MoCo v3's projector depth: 2 layers for ResNets and any other encoder; the ViTs register 3.
DEFAULT_PROJECTOR_LAYERS = 2


def _any_size(img_size: int) -> int:
    return 1


@dataclass(frozen=True)
class EncoderSpec:
    """A registered encoder: its factory, the MoCo v3 projector depth for its family, and
    ``size_multiple(img_size)``, what the input size must be a multiple of (a ViT's patch)."""

    name: str
    factory: Callable[..., nn.Module]
    projector_layers: int
    size_multiple: Callable[[int], int] = _any_size


_REGISTRY: dict[str, EncoderSpec] = {}


def register_encoder(name: str, *, projector_layers: int = DEFAULT_PROJECTOR_LAYERS,
                     size_multiple: Callable[[int], int] = _any_size):
    """Decorator adding a factory to the registry; a name can be registered once."""

    def decorate(factory: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        if name in _REGISTRY:
            raise ValueError(f"encoder {name!r} is already registered")
        _REGISTRY[name] = EncoderSpec(name, factory, projector_layers, size_multiple)
        return factory

    return decorate


def list_encoders() -> list[str]:
    return sorted(_REGISTRY)


def encoder_spec(name: str) -> EncoderSpec:
    if name not in _REGISTRY:
        raise ValueError(f"unknown encoder {name!r}; choose one of {list_encoders()}")
    return _REGISTRY[name]


def check_img_size(name: str, img_size: int) -> None:
    """Refuse an input size the encoder cannot take: not an integer from 1 to
    :data:`MAX_IMG_SIZE`, or not a multiple of its ``size_multiple`` (a ViT's patch: 4 px
    below 64, 16 from 64 on).

    Raises:
        ValueError: naming ``img_size``, the multiple and the encoder.

    Example:
        >>> check_img_size("vit_tiny", 32)
        >>> check_img_size("vit_tiny", 30)
        Traceback (most recent call last):
        ...
        ValueError: img_size=30 is not a multiple of 4, the patch size of vit_tiny at that size
    """
    if isinstance(img_size, bool) or not isinstance(img_size, int) \
            or not 1 <= img_size <= MAX_IMG_SIZE:
        raise ValueError(f"img_size must be an integer from 1 to {MAX_IMG_SIZE}, got "
                         f"{img_size!r}")
    multiple = encoder_spec(name).size_multiple(img_size)
    if img_size % multiple:
        raise ValueError(f"img_size={img_size} is not a multiple of {multiple}, the patch size "
                         f"of {name} at that size")


def fit_img_size(name: str, native: int) -> int:
    """The input size for images of ``native`` pixels: at most :data:`MAX_NATIVE_SIZE`, and
    the nearest size the encoder accepts (a multiple of a ViT's patch, at least one patch).

    Example:
        >>> fit_img_size("small_cnn", 32), fit_img_size("vit_small", 100)
        (32, 96)
        >>> fit_img_size("resnet18", 500)
        224
    """
    size = max(1, min(int(native), MAX_NATIVE_SIZE))
    multiple = encoder_spec(name).size_multiple(size)
    fitted = max(multiple, round(size / multiple) * multiple)
    # Rounding up may cross into a larger patch size (ViTs: 4 px below 64, 16 from 64 on).
    if fitted % encoder_spec(name).size_multiple(fitted):
        fitted = size - size % multiple
    return fitted


def create_encoder(name: str, *, in_chans: int = 3, img_size: int = 224) -> nn.Module:
    """Build a registered encoder with random weights.

    Args:
        name: one of :func:`list_encoders`.
        in_chans: image channels (1 for greyscale data).
        img_size: input resolution (ViTs size their position embedding from it; ResNets
            switch to a CIFAR-style stem below 64 pixels); :func:`check_img_size` refuses a
            size the encoder cannot take.

    Example:
        >>> import torch
        >>> enc = create_encoder("small_cnn", in_chans=1, img_size=28)
        >>> enc(torch.randn(2, 1, 28, 28)).shape == (2, enc.num_features)
        True
    """
    spec = encoder_spec(name)
    check_img_size(name, img_size)
    encoder = spec.factory(in_chans=in_chans, img_size=img_size)
    encoder.projector_layers = spec.projector_layers  # read by projector_depth
    return encoder


def projector_depth(encoder: nn.Module) -> int:
    """The projector depth for an encoder: its family's (3 for a ViT) when
    :func:`create_encoder` built it, else :data:`DEFAULT_PROJECTOR_LAYERS`.

    Example:
        >>> projector_depth(create_encoder("small_cnn", in_chans=1, img_size=28))
        2
    """
    return getattr(encoder, "projector_layers", DEFAULT_PROJECTOR_LAYERS)


class SmallCNN(nn.Module):
    """A four-block CNN for small images such as 28x28 greyscale (fast on a CPU)."""

    def __init__(self, in_chans: int = 1, widths: tuple[int, ...] = (32, 64, 128, 256)) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        width = in_chans
        for i, out in enumerate(widths):
            layers += [
                nn.Conv2d(width, out, 3, stride=1 if i == 0 else 2, padding=1, bias=False),
                nn.BatchNorm2d(out),
                nn.ReLU(inplace=True),
            ]
            width = out
        self.features = nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.num_features = width

    def forward(self, x):
        return self.features(x)


@register_encoder("small_cnn")
def _small_cnn(*, in_chans: int, img_size: int) -> nn.Module:
    return SmallCNN(in_chans)


def _torchvision_resnet(arch: str, *, in_chans: int, img_size: int) -> nn.Module:
    import torchvision

    model = getattr(torchvision.models, arch)(weights=None)
    if img_size < 64:
        # Small images lose too much to the 7x7/stride-2 stem and max-pool (CIFAR recipe).
        model.conv1 = nn.Conv2d(in_chans, 64, 3, stride=1, padding=1, bias=False)
        model.maxpool = nn.Identity()
    elif in_chans != 3:
        model.conv1 = nn.Conv2d(in_chans, 64, 7, stride=2, padding=3, bias=False)
    model.num_features = model.fc.in_features
    model.fc = nn.Identity()
    return model


def _vit_patch(img_size: int) -> int:
    return 16 if img_size >= 64 else 4


def _timm_vit(arch: str, *, in_chans: int, img_size: int) -> nn.Module:
    import timm

    patch = _vit_patch(img_size)
    model = timm.create_model(arch, pretrained=False, num_classes=0, in_chans=in_chans,
                              img_size=img_size, patch_size=patch)
    return model  # timm sets num_features


for _arch in ("resnet18", "resnet50"):
    register_encoder(_arch)(
        lambda *, in_chans, img_size, _a=_arch: _torchvision_resnet(_a, in_chans=in_chans,
                                                                    img_size=img_size)
    )

for _name, _arch in (
    ("vit_tiny", "vit_tiny_patch16_224"),
    ("vit_small", "vit_small_patch16_224"),
    ("vit_base", "vit_base_patch16_224"),
):
    register_encoder(_name, projector_layers=3, size_multiple=_vit_patch)(
        lambda *, in_chans, img_size, _a=_arch: _timm_vit(_a, in_chans=in_chans, img_size=img_size)
    )
