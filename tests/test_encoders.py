"""Encoders by name: the registry, any timm model, torchvision's ResNets, projector depth."""

import pytest
import timm
import torch
import torchvision

from snclr import SNCLR, create_model
from snclr.encoders import (
    TORCHVISION_RESNETS,
    backbone_recipe,
    create_encoder,
    is_vision_transformer,
    list_encoders,
    projector_depth,
)
from snclr.training.config import Config, apply_overrides, validate
from snclr.training.errors import ConfigError

HEADS = dict(projector_hidden=32, projector_dim=8, predictor_hidden=32, queue_size=16)


def projector_layers(model):
    return sum(isinstance(m, torch.nn.Linear) for m in model.projector)


def test_any_timm_name_is_built_by_timm_without_a_classifier():
    encoder = create_encoder("convnext_atto", img_size=32)
    assert isinstance(encoder, timm.models.ConvNeXt)
    assert encoder(torch.randn(2, 3, 32, 32)).shape == (2, encoder.num_features)
    assert projector_depth(encoder) == 2
    model = create_model("deit_tiny_patch16_224", img_size=32, **HEADS)  # a ViT family
    assert projector_layers(model) == 3


def test_torchvision_resnets_are_registered_and_timm_prefix_picks_timms_own():
    assert set(TORCHVISION_RESNETS) <= set(list_encoders())
    assert isinstance(create_encoder("resnet34", img_size=32), torchvision.models.ResNet)
    assert isinstance(create_encoder("timm:resnet18", img_size=32), timm.models.ResNet)


def test_projector_depth_follows_the_family_for_modules_passed_in():
    timm_vit = timm.create_model("vit_tiny_patch16_224", num_classes=0, img_size=32,
                                 patch_size=8, depth=1)
    torchvision_vit = torchvision.models.VisionTransformer(
        image_size=32, patch_size=8, num_layers=1, num_heads=2, hidden_dim=16, mlp_dim=32)
    cnn = torchvision.models.resnet18()
    assert [is_vision_transformer(m) for m in (timm_vit, torchvision_vit, cnn)] == \
        [True, True, False]
    assert projector_layers(SNCLR(timm_vit, **HEADS)) == 3  # MoCo v3's ViT projector
    assert projector_layers(SNCLR(torchvision_vit, num_features=16, **HEADS)) == 3
    assert projector_layers(SNCLR(cnn, num_features=1000, **HEADS)) == 2
    assert projector_layers(SNCLR(timm_vit, projector_layers=2, **HEADS)) == 2


def test_unknown_names_list_the_families():
    with pytest.raises(ValueError, match=r"unknown encoder 'resnet7'; choose one of \[.*"
                                         r"'resnet34'.*'vit_tiny'.*\].* or any timm model"):
        create_encoder("resnet7")
    with pytest.raises(ConfigError, match="unknown encoder 'timm:nope'"):
        validate(apply_overrides(Config(), {"encoder": "timm:nope"}))
    validate(apply_overrides(Config(), {"encoder": "convnext_atto"}))


@pytest.mark.parametrize("name, in_chans, img_size", [
    ("small_cnn", 1, 28), ("resnet18", 3, 32), ("resnet18", 1, 96), ("resnet18", 3, 224),
    ("vit_tiny", 1, 32), ("vit_tiny", 3, 224), ("convnext_atto", 3, 64)])
def test_the_recipe_builds_the_same_parameters_as_the_factory(name, in_chans, img_size):
    namespace = {}
    exec(backbone_recipe(name, in_chans=in_chans, img_size=img_size), namespace)
    ours = create_encoder(name, in_chans=in_chans, img_size=img_size).state_dict()
    theirs = namespace["backbone"].state_dict()
    assert {k: v.shape for k, v in theirs.items()} == {k: v.shape for k, v in ours.items()}
