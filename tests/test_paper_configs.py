"""The paper's four configurations pass preflight with their hub models replaced by a tiny local decoder of the
same family (a cluster address given, as on the GPU cluster they are meant for)."""

from pathlib import Path

import pytest

from pipeline.config import load_config
from pipeline.decoders import make_decoder
from pipeline.preflight import problems

pytestmark = pytest.mark.unit
PAPER = sorted((Path(__file__).resolve().parents[1] / "configs" / "paper").glob("*.yaml"))
FAMILY = {"gemma": "gemma", "llama": "llama"}


@pytest.fixture(scope="module")
def decoders(tmp_path_factory):
    return {f: make_decoder(tmp_path_factory.mktemp(f), f) for f in set(FAMILY.values())}


@pytest.mark.parametrize("path", PAPER, ids=[p.stem for p in PAPER])
def test_paper_config_passes_preflight_with_a_tiny_decoder_of_its_family(path, decoders):
    family = next(f for key, f in FAMILY.items() if path.stem.startswith(key))
    cfg = load_config(path, [f"model.name_or_path={decoders[family]}", "ray.address=10.0.0.1:6379"])
    assert cfg.train.use_gpu and cfg.train.num_workers == 8 and cfg.train.precision == "bf16"
    assert problems(cfg, cfg.run.stages) == []


def test_a_folder_that_is_not_a_model_fails_preflight_naming_it(tmp_path):
    cfg = load_config(PAPER[0], [f"model.name_or_path={tmp_path}", "ray.address=10.0.0.1:6379"])
    assert problems(cfg, cfg.run.stages) == [f"model.name_or_path: {tmp_path} has no config.json "
                                              f"(not a save_pretrained folder)"]
