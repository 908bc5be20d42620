"""Config: strict coercion of file and flag values, validation, the resume field classes."""

import dataclasses

import pytest

from snclr.training.config import (
    PRESETS,
    RESUME_FREE,
    RESUME_RECORDED,
    Config,
    ConfigError,
    apply_overrides,
    check_resume_changes,
    config_changes,
    load_config_file,
    preset,
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


# ------------------------------------------------------------- hostile values (issue 18)


def _billion_laughs(levels: int) -> str:
    lines = ['a0: &a0 ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]']
    lines += [f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 9)}]" for i in range(1, levels)]
    return "\n".join([*lines, f"epochs: *a{levels - 1}"]) + "\n"


@pytest.mark.parametrize("text, match", [
    (_billion_laughs(10), "aliases expand to more than 1000 values"),  # 9**10 strings
    ("epochs: &x [1, *x]\n", "an alias refers to a value that contains it"),
    ("epochs: " + "9" * 5000 + "\n", "it holds an integer of more than 4300 digits"),
])
def test_alias_bombs_and_huge_integers_are_refused_by_the_loader(tmp_path, text, match):
    (tmp_path / "c.yaml").write_text(text)
    with pytest.raises(ConfigError, match=match):
        load_config_file(tmp_path / "c.yaml")


def test_a_few_aliases_still_load(tmp_path):
    (tmp_path / "c.yaml").write_text("base: &lr 0.01\nlr: *lr\n")
    assert load_config_file(tmp_path / "c.yaml") == {"base": 0.01, "lr": 0.01}


@pytest.mark.parametrize("value", ["x" * 100_000, list(range(100_000)), [[[[1]] * 50] * 50],
                                   {"k" * 500: 1}, 10**5000],
                         ids=["long-str", "long-list", "nested-list", "long-key", "5000-digits"])
def test_messages_show_a_short_repr_and_the_type_of_a_value(value):
    with pytest.raises(ConfigError) as err:
        apply_overrides(Config(), {"threshold": value}, source="file")
    message = str(err.value)
    assert message.startswith("file: threshold must be bool, got ")
    assert message.endswith(f" ({type(value).__name__})") and len(message) < 140


@pytest.mark.parametrize("values, match", [
    ({"queue_size": 100_000_000_000}, r"queue_size must be <= 67108864, got 100000000000 \(int\)"),
    ({"queue_size": 2**25, "projector_dim": 256}, "more than the 4294967296 queue elements"),
    ({"seed": 99999999999999999999999}, r"seed must be <= 4294967295, got 9+ \(int\)"),
    ({"seed": -1}, r"seed must be >= 0, got -1 \(int\)"),
    ({"epochs": 10**1000}, r"epochs must be <= 1000000, got <an integer of about 1001 digits>"),
    ({"batch_size": 2**40}, "batch_size must be <= 16777216"),
    ({"img_size": 100_000}, "img_size must be <= 4096"),
    ({"num_workers": 99_999}, "num_workers must be <= 1024"),
    ({"projector_hidden": 10**9}, "projector_hidden must be <= 65536"),
    ({"projector_layers": 0}, "projector_layers must be >= 1"),
    ({"device": "x" * 10_000}, r"device must be one of .*, got 'xxx.*\.\.\..*' \(str\)$"),
])
def test_every_int_option_has_a_range(values, match):
    with pytest.raises(ConfigError, match=match):
        validate(apply_overrides(Config(), values))


def test_the_range_table_covers_every_int_option():
    from snclr.training.config import INT_RANGES

    ints = {f.name for f in dataclasses.fields(Config) if f.type.split(" ")[0] == "int"}
    assert set(INT_RANGES) == ints
    for name in PRESETS:  # the published recipes are inside the ranges
        validate(preset(name))


def test_digit_strings_too_long_for_any_option_are_refused_before_int_reads_them():
    with pytest.raises(ConfigError, match="command line: queue_size has 5000 digits, more than"):
        apply_overrides(Config(), {"queue_size": "9" * 5000}, source="command line")


def test_the_img_size_rule_is_the_librarys():
    from snclr.encoders import check_img_size
    from snclr.model import create_model

    for size, match in ((30, "img_size=30 is not a multiple of 4"),
                        (100, "img_size=100 is not a multiple of 16"),
                        (0, "img_size must be an integer from 1 to 4096, got 0")):
        with pytest.raises(ValueError, match=match):
            create_model("vit_tiny", img_size=size)
        with pytest.raises(ValueError, match=match):
            check_img_size("vit_tiny", size)
        if size:
            with pytest.raises(ConfigError, match=match):
                validate(apply_overrides(Config(), {"encoder": "vit_tiny", "img_size": size}))
    check_img_size("small_cnn", 30)
