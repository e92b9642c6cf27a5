"""Configuration files: validation, defaults, flags and the saved effective config."""

import argparse

import pytest

from analysis.config import (
    OPTIONS,
    ConfigError,
    add_config_flags,
    bundled_configs,
    config_from_flags,
    get_option,
    load_config,
    save_config,
    validate_config,
)


def test_defaults_fill_every_section():
    cfg = validate_config({})
    assert set(cfg) == {"model", "data", "train", "analysis", "output"}
    assert cfg["train"] == {
        "optimizer": "adam",
        "lr": 1e-4,
        "max_iter": 2000,
        "tol": 1e-4,
        "seed": 0,
        "device": "auto",
        "dtype": "float32",
        "progress": True,
    }
    # options without a default stay unset rather than becoming None
    assert "scale" not in cfg["model"]


@pytest.mark.parametrize(
    ("raw", "match"),
    [
        ({"train": {"lr": -1.0}}, r"'train\.lr' must be a number > 0; got -1\.0"),
        ({"train": {"lr": "fast"}}, r"'train\.lr' must be a number > 0; got 'fast'"),
        ({"train": {"max_iter": 2.5}}, r"'train\.max_iter' must be an integer >= 1"),
        ({"train": {"max_iter": True}}, r"'train\.max_iter' must be an integer"),
        ({"model": {"name": "resnet"}}, r"'model\.name' must be a string one of ds, d"),
        ({"data": {"dim": 5}}, r"'data\.dim' must be an integer >= 1 and <= 4; got 5"),
        ({"data": {"indices": [0, 7]}}, r"'data\.indices' must be a list of integers"),
        ({"data": {"indices": 0}}, r"'data\.indices' must be a list of integers"),
        ({"train": {"lrr": 1.0}}, r"'train\.lrr' is not an option of \[train\].*'lr'"),
        ({"trian": {}}, r"'trian' is not a known section.*did you mean 'train'"),
        ({"train": 3}, r"'train' must be a table of options; got 3"),
        ({"train": {"device": "gpu"}}, r"'train\.device' must be auto, cpu, cuda"),
        ({"train": {"lr": float("nan")}}, r"'train\.lr' must be a number > 0; got nan"),
    ],
    ids=[
        "negative-lr",
        "string-lr",
        "float-int",
        "bool-int",
        "bad-choice",
        "dim-range",
        "list-entry",
        "list-scalar",
        "unknown-key",
        "unknown-section",
        "section-not-table",
        "bad-device",
        "nan",
    ],
)
def test_bad_values_name_key_rule_and_value(raw, match):
    with pytest.raises(ConfigError, match=match) as info:
        validate_config(raw, source="my.toml")
    assert "(in my.toml)" in str(info.value)


def test_error_attributes():
    with pytest.raises(ConfigError) as info:
        validate_config({"train": {"lr": 0}})
    err = info.value
    assert (err.key, err.value) == ("train.lr", 0)
    assert err.rule == "must be a number > 0"


def test_toml_round_trip(tmp_path):
    cfg = validate_config(
        {"name": "x", "model": {"init": "identity", "scale": 0.5}, "data": {"dim": 3}}
    )
    path = save_config(cfg, tmp_path / "effective.toml")
    assert load_config(path) == cfg
    # no temporary files left beside it
    assert [p.name for p in tmp_path.iterdir()] == ["effective.toml"]


def test_load_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.toml"):
        load_config(tmp_path / "nope.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("[train\nlr = 1")
    with pytest.raises(ConfigError, match="must be valid TOML"):
        load_config(bad)
    bad.write_text("[train]\nlr = -2\n")
    with pytest.raises(ConfigError, match=r"'train\.lr'.*got -2 \(in .*bad\.toml\)"):
        load_config(bad)


def test_every_option_is_a_flag(tmp_path):
    parser = argparse.ArgumentParser()
    add_config_flags(parser, ["model", "data", "train", "analysis", "output"])
    flags = {a.option_strings[0] for a in parser._actions if a.option_strings}
    for section in ["model", "data", "train", "analysis", "output"]:
        for name in OPTIONS[section]:
            assert "--" + f"{section}-{name}".replace("_", "-") in flags

    file = tmp_path / "c.toml"
    file.write_text('[train]\nlr = 0.01\nmax_iter = 10\n[data]\nsource = "span_2x2"\n')
    ns = parser.parse_args(
        ["--train-lr", "0.5", "--data-indices", "0,2", "--train-progress", "false"]
    )
    cfg = config_from_flags(ns, path=file)
    # flags win over the file, the file over the defaults
    assert cfg["train"]["lr"] == 0.5
    assert cfg["train"]["max_iter"] == 10
    assert cfg["train"]["progress"] is False
    assert cfg["data"] == {**cfg["data"], "source": "span_2x2", "indices": [0, 2]}


@pytest.mark.parametrize(
    ("argv", "match"),
    [
        (
            ["--train-lr", "abc"],
            r"'train\.lr' must be a number > 0; got 'abc' \(in flag\)",
        ),
        (
            ["--train-max-iter", "0"],
            r"'train\.max_iter' must be an integer >= 1; got 0",
        ),
        (["--train-progress", "maybe"], r"'train\.progress' must be true or false"),
    ],
)
def test_bad_flags(argv, match):
    parser = argparse.ArgumentParser()
    add_config_flags(parser, ["train"])
    with pytest.raises(ConfigError, match=match) as info:
        config_from_flags(parser.parse_args(argv))
    assert info.value.source == "flag"


def test_grid_validation():
    cfg = validate_config(
        {"grid": {"data.dim": [1, 2], "train": {"seed": [0, 1]}}}, allow_grid=True
    )
    assert cfg["grid"] == {"data.dim": [1, 2], "train.seed": [0, 1]}
    assert cfg["sweep"]["n_workers"] == 2
    with pytest.raises(ConfigError, match=r"'grid\.data\.dim' must be an integer"):
        validate_config({"grid": {"data.dim": [1, 9]}}, allow_grid=True)
    with pytest.raises(
        ConfigError, match=r"'grid\.data\.dim' must be a non-empty list"
    ):
        validate_config({"grid": {"data.dim": []}}, allow_grid=True)
    with pytest.raises(ConfigError, match=r"'grid\.train\.lrr' is not an option"):
        validate_config({"grid": {"train.lrr": [1.0]}}, allow_grid=True)
    with pytest.raises(ConfigError, match=r"'grid' is not a known section"):
        validate_config({"grid": {"data.dim": [1]}})


def test_get_option_unknown():
    with pytest.raises(ConfigError, match=r"'train\.nope' is not an option"):
        get_option("train.nope")


def test_bundled_configs_validate():
    paths = bundled_configs()
    assert paths, "no bundled configs found under data/configs"
    for path in paths:
        load_config(path, allow_grid=True)


def test_bundled_configs_build_their_networks():
    from analysis._pipeline import build_model
    from analysis.sweep import expand_grid

    names = {p.stem for p in bundled_configs()}
    assert {"ds_identity", "ds_span_2x2", "ds_tiny_sweep", "protocol_lr"} <= names
    for path in bundled_configs():
        cfg = load_config(path, allow_grid=True)
        jobs = expand_grid(cfg) if cfg.get("grid") else [({}, cfg)]
        for _, job in jobs:
            model = build_model(job["model"])
            assert model.input_shape[0] in (1, 3)
        header = path.read_text().splitlines()[0]
        assert header.startswith("# "), path.name
        assert "CPU time:" in path.read_text(), path.name


def test_network_options_are_checked():
    from analysis._pipeline import build_model

    with pytest.raises(
        ConfigError, match=r"'model\.a' is not an option of network 'ds'"
    ):
        build_model({"name": "ds", "a": 3})
    with pytest.raises(ConfigError, match=r"'model\.b' must be set for network 'd_ab'"):
        build_model({"name": "d_ab", "a": 3})


def test_grid_flags():
    from analysis.config import parse_grid_flags

    grid = parse_grid_flags(["data.dim=1,2", "model.name=ds,d", "train.lr=1e-3"])
    assert grid == {"data.dim": [1, 2], "model.name": ["ds", "d"], "train.lr": [1e-3]}
    with pytest.raises(ConfigError, match=r"'grid\.data\.indices' must be varied in"):
        parse_grid_flags(["data.indices=0,1"])
    with pytest.raises(ConfigError, match=r"'train\.nope' is not an option"):
        parse_grid_flags(["train.nope=1"])
