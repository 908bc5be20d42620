"""Backbone encoders by name (a small timm-style registry).

Each factory returns an ``nn.Module`` mapping images ``(B, C, H, W)`` to features
``(B, num_features)`` and sets ``num_features`` on it; :func:`create_encoder` also records
the family's projector depth on it (:func:`projector_depth`). Nothing downloads weights:
every encoder starts from random initialisation, as self-supervised pretraining does.

Registered: ``small_cnn``, torchvision's ResNets (``resnet18`` ... ``wide_resnet101_2``)
and the aliases ``vit_tiny`` / ``vit_small`` / ``vit_base`` (timm ViTs with a 4-pixel patch
below 64 px). Any other name timm knows is built by ``timm.create_model(name,
num_classes=0)``; ``timm:NAME`` picks timm's model where torchvision has the same name.
:func:`backbone_recipe` is the code that rebuilds an encoder from its source library, so an
exported state dict loads into it under that library's own parameter names.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from torch import nn

__all__ = ["DEFAULT_PROJECTOR_LAYERS", "MAX_IMG_SIZE", "MAX_NATIVE_SIZE", "TORCHVISION_RESNETS",
           "VIT_PROJECTOR_LAYERS", "EncoderSpec", "backbone_recipe", "check_img_size",
           "create_encoder", "encoder_spec", "fit_img_size", "is_vision_transformer",
           "list_encoders", "projector_depth", "register_encoder"]

MAX_NATIVE_SIZE = 224  # a data set's native size is used up to this (the ImageNet recipes')
MAX_IMG_SIZE = 4096  # larger inputs are a mistake (a ViT-S at 4096 px has 65,536 tokens)
# MoCo v3's projector depth: 2 layers for ResNets and any other encoder, 3 for a ViT.
DEFAULT_PROJECTOR_LAYERS = 2
VIT_PROJECTOR_LAYERS = 3
TIMM_PREFIX = "timm:"


def _any_size(img_size: int) -> int:
    return 1


def _no_recipe(*, in_chans: int, img_size: int) -> str:
    return ""


@dataclass(frozen=True)
class EncoderSpec:
    """A registered encoder: its factory, the MoCo v3 projector depth for its family (None:
    read from the built module, :func:`projector_depth`), ``size_multiple(img_size)``, what
    the input size must be a multiple of (a ViT's patch), and ``recipe(in_chans=,
    img_size=)``, the code that builds the same module from its source library ("": none)."""

    name: str
    factory: Callable[..., nn.Module]
    projector_layers: int | None
    size_multiple: Callable[[int], int] = _any_size
    recipe: Callable[..., str] = _no_recipe


_REGISTRY: dict[str, EncoderSpec] = {}


def register_encoder(name: str, *, projector_layers: int = DEFAULT_PROJECTOR_LAYERS,
                     size_multiple: Callable[[int], int] = _any_size,
                     recipe: Callable[..., str] = _no_recipe):
    """Decorator adding a factory to the registry; a name can be registered once."""

    def decorate(factory: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        if name in _REGISTRY:
            raise ValueError(f"encoder {name!r} is already registered")
        _REGISTRY[name] = EncoderSpec(name, factory, projector_layers, size_multiple, recipe)
        return factory

    return decorate


def list_encoders() -> list[str]:
    """The registered names; any timm model name is accepted besides (:func:`encoder_spec`)."""
    return sorted(_REGISTRY)


def encoder_spec(name: str) -> EncoderSpec:
    """The spec of a registered name, else of a timm model (``timm.create_model(name,
    num_classes=0)``, projector depth from the module); ``timm:NAME`` always means timm's."""
    if name in _REGISTRY:
        return _REGISTRY[name]
    arch = name[len(TIMM_PREFIX):] if name.startswith(TIMM_PREFIX) else name
    if _is_timm_model(arch):
        return EncoderSpec(
            name, lambda *, in_chans, img_size: _timm_encoder(arch, in_chans=in_chans,
                                                              img_size=img_size),
            projector_layers=None,
            recipe=lambda *, in_chans, img_size: _timm_recipe(arch, in_chans=in_chans,
                                                              img_size=img_size))
    timm_note = "" if _timm_installed() else ": timm is not installed"
    raise ValueError(f"unknown encoder {name!r}; choose one of {list_encoders()} "
                     f"(torchvision's ResNets, timm ViT aliases) or any timm model name "
                     f"(timm.list_models(){timm_note})")


def _timm_installed() -> bool:
    import importlib.util

    return importlib.util.find_spec("timm") is not None


def _is_timm_model(arch: str) -> bool:
    if not arch or not _timm_installed():
        return False
    import timm

    return timm.is_model(arch)


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
    if spec.projector_layers is not None:
        encoder.projector_layers = spec.projector_layers  # read by projector_depth
    return encoder


def backbone_recipe(name: str, *, in_chans: int = 3, img_size: int = 224) -> str:
    """Python code that builds ``backbone``, the encoder :func:`create_encoder` builds, from
    its source library (timm, torchvision; snclr for ``small_cnn``), with the same parameter
    names and shapes: an exported state dict loads into it strictly.

    Example:
        >>> print(backbone_recipe("vit_tiny", in_chans=1, img_size=32))
        import timm
        backbone = timm.create_model('vit_tiny_patch16_224', num_classes=0, in_chans=1, img_size=32, patch_size=4)
    """  # noqa: E501
    return encoder_spec(name).recipe(in_chans=in_chans, img_size=img_size)


def is_vision_transformer(encoder: nn.Module) -> bool:
    """A transformer over image patches: timm's (a ``patch_embed``: ViT, DeiT, EVA, Swin...)
    or torchvision's ``VisionTransformer``."""
    return hasattr(encoder, "patch_embed") or any(
        cls.__name__ == "VisionTransformer" for cls in type(encoder).__mro__)


def projector_depth(encoder: nn.Module) -> int:
    """The projector depth for an encoder: its family's when :func:`create_encoder` built
    it, else 3 for a vision transformer (:func:`is_vision_transformer`) and
    :data:`DEFAULT_PROJECTOR_LAYERS` for anything else (MoCo v3).

    Example:
        >>> projector_depth(create_encoder("small_cnn", in_chans=1, img_size=28))
        2
    """
    if hasattr(encoder, "projector_layers"):
        return encoder.projector_layers
    return VIT_PROJECTOR_LAYERS if is_vision_transformer(encoder) else DEFAULT_PROJECTOR_LAYERS


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


def _small_cnn_recipe(*, in_chans: int, img_size: int) -> str:
    return ("from snclr.encoders import create_encoder\n"
            f"backbone = create_encoder('small_cnn', in_chans={in_chans}, img_size={img_size})")


@register_encoder("small_cnn", recipe=_small_cnn_recipe)
def _small_cnn(*, in_chans: int, img_size: int) -> nn.Module:
    return SmallCNN(in_chans)


# torchvision's ResNet family (ResNet, ResNeXt, wide ResNet): one class, one stem rule.
TORCHVISION_RESNETS = ("resnet18", "resnet34", "resnet50", "resnet101", "resnet152",
                       "resnext50_32x4d", "resnext101_32x8d", "resnext101_64x4d",
                       "wide_resnet50_2", "wide_resnet101_2")


def _resnet_stem(in_chans: int, img_size: int) -> tuple[int, int, int] | None:
    """(kernel, stride, padding) of the first convolution when it is not torchvision's
    default, which is kept for RGB at 64 px and more."""
    if img_size < 64:
        # Small images lose too much to the 7x7/stride-2 stem and max-pool (CIFAR recipe).
        return 3, 1, 1
    return None if in_chans == 3 else (7, 2, 3)


def _torchvision_resnet(arch: str, *, in_chans: int, img_size: int) -> nn.Module:
    import torchvision

    model = getattr(torchvision.models, arch)(weights=None)
    stem = _resnet_stem(in_chans, img_size)
    if stem is not None:
        kernel, stride, padding = stem
        model.conv1 = nn.Conv2d(in_chans, 64, kernel, stride=stride, padding=padding, bias=False)
    if img_size < 64:
        model.maxpool = nn.Identity()
    model.num_features = model.fc.in_features
    model.fc = nn.Identity()
    return model


def _torchvision_resnet_recipe(arch: str, *, in_chans: int, img_size: int) -> str:
    lines = ["import torch, torchvision", f"backbone = torchvision.models.{arch}()"]
    stem = _resnet_stem(in_chans, img_size)
    if stem is not None:
        kernel, stride, padding = stem
        lines.append(f"backbone.conv1 = torch.nn.Conv2d({in_chans}, 64, {kernel}, stride={stride}, "
                     f"padding={padding}, bias=False)")
    if img_size < 64:
        lines.append("backbone.maxpool = torch.nn.Identity()")
    lines.append("backbone.fc = torch.nn.Identity()  # the export has no classifier")
    return "\n".join(lines)


def _vit_patch(img_size: int) -> int:
    return 16 if img_size >= 64 else 4


def _timm_kwargs(arch: str, *, in_chans: int, img_size: int, **extra) -> dict:
    """timm.create_model's arguments; ``img_size`` only for models built for one input
    size (ViTs: their position embedding), which timm's config marks."""
    from timm.models import get_pretrained_cfg

    kwargs = dict(num_classes=0, in_chans=in_chans)
    if getattr(get_pretrained_cfg(arch), "fixed_input_size", False):
        kwargs["img_size"] = img_size
    return {**kwargs, **extra}


def _timm_encoder(arch: str, *, in_chans: int, img_size: int, **extra) -> nn.Module:
    import timm

    kwargs = _timm_kwargs(arch, in_chans=in_chans, img_size=img_size, **extra)
    return timm.create_model(arch, pretrained=False, **kwargs)  # timm sets num_features


def _timm_recipe(arch: str, *, in_chans: int, img_size: int, **extra) -> str:
    kwargs = _timm_kwargs(arch, in_chans=in_chans, img_size=img_size, **extra)
    listed = ", ".join(f"{key}={value!r}" for key, value in kwargs.items())
    return f"import timm\nbackbone = timm.create_model({arch!r}, {listed})"


for _arch in TORCHVISION_RESNETS:
    register_encoder(
        _arch,
        recipe=lambda *, in_chans, img_size, _a=_arch: _torchvision_resnet_recipe(
            _a, in_chans=in_chans, img_size=img_size),
    )(
        lambda *, in_chans, img_size, _a=_arch: _torchvision_resnet(_a, in_chans=in_chans,
                                                                    img_size=img_size)
    )

for _name, _arch in (
    ("vit_tiny", "vit_tiny_patch16_224"),
    ("vit_small", "vit_small_patch16_224"),
    ("vit_base", "vit_base_patch16_224"),
):
    register_encoder(
        _name, projector_layers=VIT_PROJECTOR_LAYERS, size_multiple=_vit_patch,
        recipe=lambda *, in_chans, img_size, _a=_arch: _timm_recipe(
            _a, in_chans=in_chans, img_size=img_size, patch_size=_vit_patch(img_size)),
    )(
        lambda *, in_chans, img_size, _a=_arch: _timm_encoder(
            _a, in_chans=in_chans, img_size=img_size, patch_size=_vit_patch(img_size))
    )
