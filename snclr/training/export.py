"""``snclr export``: a checkpoint's backbone as a plain state dict for downstream use.

The file holds the encoder's weights only (no heads, queue, optimiser or RNG), under the
parameter names of its source library: the encoders are timm's and torchvision's own modules,
so their names need no mapping, and :func:`snclr.encoders.backbone_recipe` is the code that
builds the module they load into strictly (the export prints it).
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import torch

from snclr.encoders import backbone_recipe
from snclr.training.errors import ConfigError
from snclr.training.evaluate import load_backbone

__all__ = ["FORMATS", "export_backbone"]

FORMATS = (".pt", ".safetensors")


def _check_output(output: Path) -> None:
    if output.suffix not in FORMATS:
        raise ConfigError(f"--output {str(output)!r} must end in one of {FORMATS}")
    if output.is_dir():
        raise ConfigError(f"--output {str(output)!r} is a directory")
    if not output.parent.is_dir():
        raise ConfigError(f"--output {str(output)!r}: folder {str(output.parent)!r} does not "
                          "exist")
    if output.suffix == ".safetensors" and importlib.util.find_spec("safetensors") is None:
        raise ConfigError(f"--output {str(output)!r} needs the safetensors package "
                          "(pip install safetensors), or write .pt")


def export_backbone(checkpoint: str, output: str | Path, *, momentum: bool = False) -> dict:
    """Write the online (``momentum``: the momentum) encoder's state dict to ``output``.

    ``.pt`` is a ``torch.save``d dict of tensors (``torch.load(..., weights_only=True)``
    reads it); ``.safetensors`` needs the safetensors package and carries the encoder name
    and the recipe in its metadata. Written to a temporary file and renamed.

    Returns:
        ``{"output", "encoder", "tensors", "parameters", "recipe", "load"}``: ``recipe``
        builds ``backbone``, ``load`` loads the file into it.

    Raises:
        ConfigError: a bad ``output`` (suffix, folder, no safetensors) or checkpoint.
    """
    output = Path(output)
    _check_output(output)  # before the checkpoint is read: a typo costs nothing
    encoder, info = load_backbone(checkpoint, momentum=momentum)
    name = info["config"].encoder
    recipe = backbone_recipe(name, in_chans=info["in_chans"], img_size=info["img_size"])
    # Fresh contiguous tensors: safetensors refuses views and shared storage.
    state = {key: value.detach().clone().contiguous()
             for key, value in encoder.state_dict().items()}
    tmp = output.with_name(output.name + ".tmp")
    if output.suffix == ".safetensors":
        from safetensors.torch import save_file

        save_file(state, str(tmp), metadata={"encoder": name, "recipe": recipe,
                                              "branch": "momentum" if momentum else "online"})
    else:
        torch.save(state, tmp)
    os.replace(tmp, output)
    return {"output": str(output), "encoder": name, "tensors": len(state),
            "parameters": sum(p.numel() for p in encoder.parameters()), "recipe": recipe,
            "load": _load_line(output)}


def _load_line(output: Path) -> str:
    if output.suffix == ".safetensors":
        return ("from safetensors.torch import load_file\n"
                f"backbone.load_state_dict(load_file({str(output)!r}))")
    return ("import torch\n"
            f"backbone.load_state_dict(torch.load({str(output)!r}, weights_only=True))")
