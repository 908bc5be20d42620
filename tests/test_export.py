"""snclr export: the backbone loads strictly into its source library's own module."""

import re
import sys
from pathlib import Path

import pytest
import timm
import torch
import torchvision
from safetensors.torch import load_file

from snclr.training.checkpoint import build_model, write_checkpoint
from snclr.training.cli import main
from snclr.training.config import apply_overrides, preset

README = Path(__file__).resolve().parents[1] / "README.md"


def make_checkpoint(path, encoder, *, img_size, in_chans=3):
    """A checkpoint as pretrain writes it, of an untrained model (no training needed)."""
    torch.manual_seed(0)
    config = apply_overrides(preset("demo"), {"encoder": encoder, "img_size": img_size,
                                              "queue_size": 16})
    model = build_model(config, in_chans=in_chans, img_size=img_size)
    with torch.no_grad():  # the momentum encoder differs from the online one, as after training
        for param in model.momentum_encoder.parameters():
            param.add_(1.0)
    write_checkpoint(path, {"config": config.to_dict(), "model": model.state_dict(),
                            "data_shape": {"in_chans": in_chans, "img_size": img_size}})
    return model


def export(capsys, *argv):
    code = main(["export", *map(str, argv)])
    out, err = capsys.readouterr()
    return code, out, err


def same_features(snclr_encoder, backbone, in_chans, img_size):
    images = torch.randn(2, in_chans, img_size, img_size)
    snclr_encoder.eval(), backbone.eval()
    with torch.no_grad():
        torch.testing.assert_close(backbone(images), snclr_encoder(images))


def test_vit_loads_strictly_into_timm_at_224_px(tmp_path, capsys):
    model = make_checkpoint(tmp_path / "c.pt", "vit_tiny", img_size=224)
    code, out, _ = export(capsys, "--checkpoint", tmp_path / "c.pt", "--output", tmp_path / "b.pt")
    assert code == 0 and "wrote" in out
    backbone = timm.create_model("vit_tiny_patch16_224", num_classes=0)
    backbone.load_state_dict(torch.load(tmp_path / "b.pt", weights_only=True))  # strict
    same_features(model.encoder, backbone, 3, 224)


def test_resnet_loads_into_torchvision_with_only_fc_missing(tmp_path, capsys):
    model = make_checkpoint(tmp_path / "c.pt", "resnet18", img_size=224)
    assert export(capsys, "--checkpoint", tmp_path / "c.pt", "--output", tmp_path / "b.pt")[0] == 0
    backbone = torchvision.models.resnet18()
    result = backbone.load_state_dict(torch.load(tmp_path / "b.pt", weights_only=True),
                                      strict=False)
    assert sorted(result.missing_keys) == ["fc.bias", "fc.weight"]
    assert result.unexpected_keys == []
    backbone.fc = torch.nn.Identity()
    same_features(model.encoder, backbone, 3, 224)


def test_momentum_flag_exports_the_momentum_encoder(tmp_path, capsys):
    model = make_checkpoint(tmp_path / "c.pt", "small_cnn", img_size=28, in_chans=1)
    for flag, encoder in (([], model.encoder), (["--momentum"], model.momentum_encoder)):
        out = tmp_path / f"b{len(flag)}.pt"
        assert export(capsys, "--checkpoint", tmp_path / "c.pt", "--output", out, *flag)[0] == 0
        saved = torch.load(out, weights_only=True)
        assert saved.keys() == encoder.state_dict().keys()
        for key, value in encoder.state_dict().items():
            torch.testing.assert_close(saved[key], value)


def test_safetensors_holds_the_same_tensors_and_the_recipe(tmp_path, capsys):
    make_checkpoint(tmp_path / "c.pt", "small_cnn", img_size=28, in_chans=1)
    for name in ("b.pt", "b.safetensors"):
        code = export(capsys, "--checkpoint", tmp_path / "c.pt", "--output", tmp_path / name)[0]
        assert code == 0
    pt, st = torch.load(tmp_path / "b.pt", weights_only=True), load_file(tmp_path / "b.safetensors")
    assert pt.keys() == st.keys() and all(torch.equal(pt[k], st[k]) for k in pt)
    from safetensors import safe_open

    with safe_open(tmp_path / "b.safetensors", "pt") as f:
        assert f.metadata()["encoder"] == "small_cnn" and "create_encoder" in f.metadata()["recipe"]


@pytest.mark.parametrize("encoder, img_size, in_chans", [
    ("vit_tiny", 32, 1), ("resnet18", 32, 3), ("resnet18", 96, 1), ("convnext_atto", 32, 3),
    ("small_cnn", 28, 1)], ids=["vit-32px-grey", "resnet-32px", "resnet-96px-grey",
                                "timm-convnext", "small-cnn"])
def test_the_printed_recipe_builds_a_module_the_export_loads_into_strictly(
        encoder, img_size, in_chans, tmp_path, capsys, monkeypatch):
    model = make_checkpoint(tmp_path / "c.pt", encoder, img_size=img_size, in_chans=in_chans)
    monkeypatch.chdir(tmp_path)
    code, out, _ = export(capsys, "--checkpoint", "c.pt", "--output", "backbone.pt")
    assert code == 0
    namespace = {}
    exec("\n".join(out.splitlines()[1:]), namespace)  # everything after the "wrote" line
    same_features(model.encoder, namespace["backbone"], in_chans, img_size)


def _readme_loading_blocks() -> list[str]:
    text = README.read_text()
    section = text[text.index("## Exporting the backbone"):text.index("## Comparing methods")]
    return re.findall(r"```py\n(.*?)```", section, flags=re.S)


@pytest.mark.parametrize("encoder, img_size, in_chans", [("vit_tiny", 32, 1), ("resnet18", 32, 3)],
                         ids=["vit", "resnet"])
def test_readme_says_how_to_load_a_small_image_backbone(encoder, img_size, in_chans, tmp_path,
                                                       capsys, monkeypatch):
    blocks = [b for b in _readme_loading_blocks() if f"# {encoder} at {img_size} px" in b]
    assert len(blocks) == 1
    model = make_checkpoint(tmp_path / "c.pt", encoder, img_size=img_size, in_chans=in_chans)
    monkeypatch.chdir(tmp_path)
    assert export(capsys, "--checkpoint", "c.pt", "--output", "backbone.pt")[0] == 0
    namespace = {}
    exec(blocks[0], namespace)  # loads strictly
    same_features(model.encoder, namespace["backbone"], in_chans, img_size)


@pytest.mark.parametrize("output, message", [
    ("b.bin", r"--output '.*b\.bin' must end in one of \('\.pt', '\.safetensors'\)"),
    ("missing/b.pt", r"--output '.*b\.pt': folder '.*missing' does not exist"),
    ("b.safetensors", r"--output '.*' needs the safetensors package \(pip install safetensors\)"),
], ids=["suffix", "folder", "no-safetensors"])
def test_bad_output_exits_2_with_one_line_and_writes_nothing(output, message, tmp_path, capsys,
                                                             monkeypatch):
    make_checkpoint(tmp_path / "c.pt", "small_cnn", img_size=28, in_chans=1)
    monkeypatch.setitem(sys.modules, "safetensors", None)  # as where it is not installed
    code, _, err = export(capsys, "--checkpoint", tmp_path / "c.pt", "--output",
                          tmp_path / output)
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert re.search(r"^snclr export: error: " + message, err)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.pt"]


def test_missing_checkpoint_exits_2(tmp_path, capsys):
    code, _, err = export(capsys, "--checkpoint", tmp_path / "none.pt", "--output",
                          tmp_path / "b.pt")
    assert code == 2 and "does not exist" in err


def test_non_finite_weights_of_the_exported_encoder_exit_2(tmp_path, capsys):
    make_checkpoint(tmp_path / "c.pt", "small_cnn", img_size=28, in_chans=1)
    payload = torch.load(tmp_path / "c.pt", weights_only=True)
    payload["model"]["momentum_encoder.features.0.weight"][0] = float("nan")
    write_checkpoint(tmp_path / "c.pt", {k: v for k, v in payload.items() if k != "format"})
    assert export(capsys, "--checkpoint", tmp_path / "c.pt", "--output", tmp_path / "b.pt")[0] == 0
    code, _, err = export(capsys, "--checkpoint", tmp_path / "c.pt", "--output",
                          tmp_path / "m.pt", "--momentum")
    assert code == 2 and "non-finite weights (NaN or infinity in 1 tensors of the momentum " \
        "encoder, e.g. features.0.weight)" in err
    assert not (tmp_path / "m.pt").exists()


def test_help(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["export", "--help"])
    assert exit_info.value.code == 0 and "--momentum" in capsys.readouterr().out
