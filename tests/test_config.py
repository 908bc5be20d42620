"""Config: strict coercion of file and flag values, validation, the resume field classes."""

import dataclasses

import pytest

from snclr.training.config import (
    RESUME_FREE,
    RESUME_RECORDED,
    Config,
    ConfigError,
    apply_overrides,
    check_resume_changes,
    config_changes,
    load_config_file,
    resumed_config,
    validate,
)


@pytest.mark.parametrize(
    "text, match",
    [
        ("epochs: true", "epochs must be int, got True"),
        ("threshold: 2", "threshold must be bool, got 2"),
        ("threshold: 1", "threshold must be bool, got 1"),
        ("epochs: 1.5", "epochs must be int, got 1.5"),
        ("epochs: 2.0", "epochs must be int, got 2.0"),
        ("lr: true", "lr must be float, got True"),
        ("lr: fast", "lr must be float, got 'fast'"),
        ("data: 3", "data must be str, got 3"),
        ("device: no", "device must be str, got False"),
    ],
)
def test_yaml_coercion_is_strict(tmp_path, text, match):
    (tmp_path / "c.yaml").write_text(text + "\n")
    with pytest.raises(ConfigError, match=match):
        apply_overrides(Config(), load_config_file(tmp_path / "c.yaml"), source="file")


def test_yaml_values_of_the_right_type_are_accepted(tmp_path):
    # PyYAML reads 1e-3 (no dot) as a string: a float field still takes it.
    (tmp_path / "c.yaml").write_text("lr: 1e-3\nepochs: 3\nthreshold: true\nwarmup_epochs: 2\n"
                                     "projector_layers: null\n")
    values = load_config_file(tmp_path / "c.yaml")
    assert values["lr"] == "1e-3"
    config = apply_overrides(Config(), values)
    assert (config.lr, config.epochs, config.threshold) == (1e-3, 3, True)
    assert config.warmup_epochs == 2.0
    assert isinstance(config.warmup_epochs, float) and config.projector_layers is None
    # Command-line flags arrive as strings.
    flags = apply_overrides(Config(), {"epochs": "7", "lr": "0.5", "threshold": "false",
                                       "projector_layers": "3"})
    assert (flags.epochs, flags.lr, flags.threshold, flags.projector_layers) == (7, 0.5, False, 3)


@pytest.mark.parametrize("name", ["lr", "warmup_epochs", "weight_decay", "temperature",
                                  "attention_temperature", "grad_clip", "momentum_base"])
@pytest.mark.parametrize("value", ["nan", "inf", "-inf"])
def test_non_finite_floats_are_rejected(name, value):
    config = apply_overrides(Config(), {name: value})
    with pytest.raises(ConfigError, match=f"{name} must be a finite number, got {value}"):
        validate(config)


@pytest.mark.parametrize(
    "values, match",
    [
        ({"backend": "bogus"}, "backend must be one of"),
        ({"attention_temperature": 0}, "attention_temperature must be > 0, got 0.0"),
        ({"temperature": -1}, "temperature must be > 0, got -1.0"),
        ({"encoder": "vit_tiny", "img_size": 30}, "img_size=30 is not a multiple of 4"),
        ({"encoder": "vit_tiny", "img_size": 100}, "img_size=100 is not a multiple of 16"),
        ({"accumulate": 0}, "accumulate must be >= 1, got 0"),
        ({"save_every_steps": -1}, "save_every_steps must be >= 0, got -1"),
        ({"keep_last": -2}, "keep_last must be >= 0, got -2"),
    ],
)
def test_validation_messages(values, match):
    with pytest.raises(ConfigError, match=match):
        validate(apply_overrides(Config(), values))
    validate(apply_overrides(Config(), {"encoder": "vit_tiny", "img_size": 32}))


def test_resume_takes_only_the_given_fields():
    saved = Config(lr=0.01, threshold=True, epochs=4, output_dir="old", stop_after=1)
    asked = Config(lr=0.5, epochs=6, output_dir="new")  # defaults elsewhere: not given
    resumed = resumed_config(saved, asked, given={"epochs"})
    assert (resumed.lr, resumed.threshold, resumed.epochs) == (0.01, True, 6)
    # The folder and the simulated interruption belong to this invocation.
    assert (resumed.output_dir, resumed.stop_after) == ("new", 0)
    assert resumed_config(saved, asked, given=None) == asked  # Python API: the whole config


def test_resume_change_classes():
    saved = Config()
    free = dataclasses.replace(saved, log_every=1, num_workers=0, backend="torch", knn_every=0,
                               save_every_steps=100, keep_last=3, channels_last=True,
                               compile=True)
    assert check_resume_changes(config_changes(saved, free), allow=False) == {}
    longer = dataclasses.replace(saved, epochs=12)
    recorded = check_resume_changes(config_changes(saved, longer), allow=False)
    assert recorded == {"epochs": (8, 12)}
    changed = dataclasses.replace(saved, lr=0.1, num_neighbors=3, epochs=9)
    listing = r"\(num_neighbors 5 -> 3, lr 0.006 -> 0.1\); omit"
    with pytest.raises(ConfigError, match=listing) as err:
        check_resume_changes(config_changes(saved, changed), allow=False)
    assert "epochs" not in str(err.value)
    assert check_resume_changes(config_changes(saved, changed), allow=True) == {
        "num_neighbors": (5, 3), "epochs": (8, 9), "lr": (0.006, 0.1)}
    assert "epochs" in RESUME_RECORDED and "lr" not in RESUME_FREE
    # Micro-batches change what each part contrasts: refused unless allowed.
    with pytest.raises(ConfigError, match=r"\(accumulate 1 -> 2\)"):
        check_resume_changes(config_changes(saved, dataclasses.replace(saved, accumulate=2)),
                             allow=False)


def test_the_temperatures_are_stated_once():
    import inspect

    from snclr import SNCLR, functional

    model = inspect.signature(SNCLR).parameters
    loss = inspect.signature(functional.soft_neighbor_loss).parameters
    for name, value in (("temperature", functional.TEMPERATURE),
                        ("attention_temperature", functional.ATTENTION_TEMPERATURE)):
        assert getattr(Config(), name) == model[name].default == loss[name].default == value
    assert (functional.TEMPERATURE, functional.ATTENTION_TEMPERATURE) == (0.2, 1.0)
