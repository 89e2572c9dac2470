import dataclasses
from pathlib import Path

import pytest

from pipeline.config import (ConfigError, PipelineConfig, config_hash, flatten, from_flat, load_config,
                             SourceConfig, parse_override, to_yaml)

pytestmark = pytest.mark.unit
REPO = Path(__file__).resolve().parents[1]


def test_defaults_are_valid_and_frozen():
    cfg = PipelineConfig()
    assert cfg.loss.beta == 0.9 and cfg.loss.name == "normbt"
    with pytest.raises(dataclasses.FrozenInstanceError):
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
    assert cfg.data.sources == (SourceConfig(path="a.jsonl", format="hh"),)
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


@pytest.mark.parametrize("section,body,expected", [
    ("data", "sources: [{pth: a.jsonl}]", r"data.sources\[0\]: unknown key 'pth' \(did you mean: path"),
    ("data", "sources: [{path: a.jsonl, columns: {chosen: c, rejectd: r}}]",
     r"data.sources\[0\].columns: unknown key 'rejectd' \(did you mean: rejected"),
    ("data", "sources: [{synthetic: {n_trian: 5}}]", r"data.sources\[0\].synthetic: unknown key 'n_trian' \(did you mean: n_train"),
    ("data", "sources: [{path: a.jsonl, format: sharegtp}]", r"format='sharegtp'.*\(did you mean: sharegpt"),
    ("rewardbench", "benchmarks: [{nmae: x, synthetic: {}}]", r"rewardbench.benchmarks\[0\]: unknown key 'nmae' \(did you mean: name"),
    ("best_of_n", "prompts: {synthetc: {}}", r"best_of_n.prompts: unknown key 'synthetc' \(did you mean: synthetic"),
    ("tune", "search_space: {train.lr: {loguniformm: [1, 2]}}",
     r"tune.search_space\['train.lr'\]: unknown key 'loguniformm' \(did you mean: loguniform"),
    ("tune", "search_space: {train.lrr: {uniform: [1, 2]}}", r"tune.search_space: unknown key 'train.lrr' \(did you mean: train.lr"),
    ("tune", "losses: [{loss.name: bt}, {loss.nam: normbt}]", r"tune.losses\[1\]: unknown key 'loss.nam' \(did you mean: loss.name"),
    ("tune", "losses: [{loss.name: bt}, {loss.name: nrombt}]", r"tune.losses\[1\]: loss.name='nrombt'.*\(did you mean: normbt"),
    ("tune", "trial_overrides: {train.max_step: 2}", r"tune.trial_overrides: unknown key 'train.max_step' \(did you mean: train.max_steps"),
])
def test_a_bad_nested_key_fails_at_load_naming_the_file_the_key_and_the_closest_valid_one(section, body, expected,
                                                                                          tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(f"{section}:\n  {body}\n")
    with pytest.raises(ConfigError, match=expected) as err:
        load_config(bad)
    assert str(bad) in str(err.value)


def test_describe_documents_the_nested_sections_and_their_choices():
    from pipeline.config import describe

    text = describe()
    for line in ("data.sources[].columns.first_is_better", "rewardbench.benchmarks[].format",
                 "best_of_n.prompts.field", "tune.search_space[].loguniform", "data.sources[].synthetic.n_train"):
        assert line in text, line
    assert "[auto | transformers | vllm]" in text  # best_of_n.engine: a Literal, listed


def test_non_finite_numbers_and_a_limit_on_the_synthetic_source_are_refused_at_load():
    with pytest.raises(ConfigError, match="finite"):
        load_config(None, ["data.sources=[{path: a.jsonl, weight: .inf}]"])
    with pytest.raises(ConfigError, match="finite"):
        load_config(None, ["train.lr=nan"])
    with pytest.raises(ConfigError, match="limit does not apply to synthetic"):
        load_config(None, ["data.sources=[{synthetic: {}, limit: 10}]"])


def test_the_pairing_and_margin_scale_choices_of_a_source_load_and_misplaced_ones_are_refused():
    cfg = load_config(None, ["data.sources=[{path: uf.jsonl, aspect: mean}, {path: ufb.jsonl, margin_scale: raw}]"])
    assert (cfg.data.sources[0].aspect, cfg.data.sources[1].margin_scale) == ("mean", "raw")
    assert cfg.data.sources[0].margin_scale == "range", "margins on one scale unless raw is asked for"
    with pytest.raises(ConfigError, match="margin_scale applies to the unified_feedback format only"):
        load_config(None, ["data.sources=[{path: a.jsonl, format: hh, margin_scale: raw}]"])
