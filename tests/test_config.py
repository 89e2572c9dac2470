from pathlib import Path

import pytest

from pipeline.config import (ConfigError, PipelineConfig, config_hash, flatten, from_flat, load_config,
                             parse_override, to_yaml)

pytestmark = pytest.mark.unit
REPO = Path(__file__).resolve().parents[1]


def test_defaults_are_valid_and_frozen():
    cfg = PipelineConfig()
    assert cfg.loss.beta == 0.9 and cfg.loss.name == "normbt"
    with pytest.raises(Exception):
        cfg.loss.beta = 0.5  # frozen


def test_flatten_round_trip_gives_equal_config():
    cfg = load_config(REPO / "configs" / "smoke.yaml", ["train.lr=0.01", "loss.name=bt"])
    again = from_flat(flatten(cfg))
    assert again == cfg
    assert flatten(cfg)["train.lr"] == 0.01


@pytest.mark.parametrize("path", sorted((REPO / "configs").rglob("*.yaml")), ids=lambda p: p.name)
def test_every_yaml_under_configs_loads(path):
    assert isinstance(load_config(path), PipelineConfig)


def test_unknown_key_names_key_file_and_suggestions(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("train:\n  lr_rate: 0.1\n")
    with pytest.raises(ConfigError) as err:
        load_config(bad)
    msg = str(err.value)
    assert "train.lr_rate" in msg and str(bad) in msg and "train.lr" in msg


def test_unknown_section_is_an_error(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("trainer:\n  lr: 0.1\n")
    with pytest.raises(ConfigError, match="unknown section 'trainer'.*train"):
        load_config(bad)


def test_override_values_are_yaml():
    cfg = load_config(None, ["data.sources=[{path: a.jsonl, format: hh}]", "train.num_workers=1"])
    assert cfg.data.sources == ({"path": "a.jsonl", "format": "hh"},)
    assert cfg.train.num_workers == 1
    assert parse_override("a.b=[1, 2]") == ("a.b", [1, 2])
    with pytest.raises(ConfigError):
        parse_override("novalue")


def test_type_and_cross_field_checks():
    with pytest.raises(ConfigError, match="train.lr expects"):
        load_config(None, ["train.lr=fast"])
    with pytest.raises(ConfigError, match="loss.eps"):
        load_config(None, ["loss.eps=0"])
    with pytest.raises(ConfigError, match="loss.name"):
        load_config(None, ["loss.name=hinge"])
    with pytest.raises(ConfigError, match="zero_stage"):
        load_config(None, ["train.zero_stage=4"])
    with pytest.raises(ConfigError, match="tune.search_space"):
        load_config(None, ["tune.search_space={train.lrr: {uniform: [0, 1]}}"])


def test_int_is_accepted_for_float_and_yaml_dump_reloads(tmp_path):
    cfg = load_config(None, ["train.lr=1"])
    assert cfg.train.lr == 1.0 and isinstance(cfg.train.lr, float)
    dumped = tmp_path / "full.yaml"
    dumped.write_text(to_yaml(cfg))
    assert load_config(dumped) == cfg


def test_config_hash_depends_only_on_selected_keys():
    a = PipelineConfig()
    b = load_config(None, ["train.lr=0.5"])
    assert config_hash(a, ("data",)) == config_hash(b, ("data",))
    assert config_hash(a, ("train",)) != config_hash(b, ("train",))
    assert config_hash(a, ("data",), {"up": "x"}) != config_hash(a, ("data",), {"up": "y"})


def test_scientific_notation_without_dot_is_a_float():
    assert load_config(None, ["train.lr=1e-5"]).train.lr == 1e-5
