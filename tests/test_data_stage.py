"""Data stage on real public files and on a corpus of bad rows, through Ray Data."""

from collections import Counter
from pathlib import Path

import pandas as pd
import pytest

from pipeline import runner, tracking
from pipeline.config import load_config
from stages.data import prepare_preferences
from tests.test_formats import EXPECTED_MIXED

pytestmark = [pytest.mark.integration, pytest.mark.timeout(600)]
REPO = Path(__file__).resolve().parents[1]
BAD = REPO / "tests" / "data" / "bad_rows"


def _run(tmp_path, overrides):
    cfg = load_config(REPO / "configs" / "smoke.yaml", overrides)
    out = tmp_path / "data"
    out.mkdir(parents=True, exist_ok=True)
    ctx = runner.StageContext(cfg=cfg, run_dir=tmp_path, out_dir=out, upstream={},
                              tracker=tracking.RunLogger(None, None), log=lambda _: None)
    return prepare_preferences(ctx)


def test_real_public_files_parse_with_expected_counts(ray_session, shared_data, tmp_path):
    files = {
        "rewardbench_v1/rewardbench_v1_filtered.jsonl": (2985, {}),
        "hh_rlhf/helpful_train_sample.jsonl": (499, {"empty_response": 1}),  # a genuinely empty final turn
        "hh_rlhf/harmless-base_test.jsonl.gz": (2308, {"empty_response": 4}),
        "dpo_demo/dpo_en_demo.json": (300, {}),
    }
    sources = "[" + ", ".join(f"{{path: '{shared_data / f}'}}" for f in files) + "]"
    result = _run(tmp_path, [f"data.sources={sources}", "data.max_length=256"])
    train = pd.read_parquet(result.outputs["train"])
    val = pd.read_parquet(result.outputs["validation"])
    quarantine = pd.read_parquet(result.outputs["quarantine"])
    good = pd.concat([train, val])
    for rel, (rows, bad) in files.items():
        label = str(shared_data / rel)
        assert (good["source"] == label).sum() == rows, rel
        assert dict(Counter(quarantine[quarantine["source"] == label]["reason"])) == bad, rel
    # RewardBench keeps its subsets; the split is ~10% validation by id hash.
    rb = good[good["source"] == str(shared_data / "rewardbench_v1/rewardbench_v1_filtered.jsonl")]
    assert rb["subset"].value_counts()["math-prm"] == 447
    assert 0.05 < len(val) / len(good) < 0.15
    # Token columns: lengths match ids, nothing over max_length, decoder scores the last token.
    assert (train["chosen_ids"].map(len) == train["chosen_len"]).all()
    assert train[["chosen_len", "rejected_len"]].max().max() <= 256
    assert (train["chosen_scored"] == train["chosen_len"] - 1).all()
    assert train["truncated"].sum() > 0, "long HH/RewardBench rows must be truncated, and counted"


def test_bad_rows_quarantined_with_reasons_good_rows_pass(ray_session, tmp_path):
    sources = f"[{{path: '{BAD / 'mixed.jsonl'}'}}, {{path: '{BAD / 'sharegpt_array.json'}'}}]"
    result = _run(tmp_path, [f"data.sources={sources}"])
    quarantine = pd.read_parquet(result.outputs["quarantine"])
    good = pd.concat([pd.read_parquet(result.outputs[s]) for s in ("train", "validation")])
    mixed = str(BAD / "mixed.jsonl")
    got = {int(loc.rsplit(":", 1)[1]): reason for loc, reason in
           quarantine[quarantine["source"] == mixed][["location", "reason"]].itertuples(index=False)}
    assert got == {line: reason for line, reason in EXPECTED_MIXED.items() if reason is not None}
    good_lines = {int(loc.rsplit(":", 1)[1]) for loc in good[good["source"] == mixed]["location"]}
    assert good_lines == {line for line, reason in EXPECTED_MIXED.items() if reason is None}
    assert len(good) + len(quarantine) == len(EXPECTED_MIXED) + 3  # + the 3-row ShareGPT array
    import json

    stats = json.loads(Path(result.outputs["stats"]).read_text())
    assert stats["quarantine"]["total"] == len(quarantine)
    assert sum(stats["quarantine"]["by_reason"].values()) == len(quarantine)


def test_overlength_drop_is_quarantined_and_counted(ray_session, tmp_path):
    result = _run(tmp_path, ["data.max_length=24", "data.overlength=drop"])
    quarantine = pd.read_parquet(result.outputs["quarantine"])
    good = pd.concat([pd.read_parquet(result.outputs[s]) for s in ("train", "validation")])
    assert (quarantine["reason"] == "over_length").sum() > 0
    assert len(good) + len(quarantine) == 64 + 32  # the smoke synthetic train + validation rows
    assert good[["chosen_len", "rejected_len"]].max().max() <= 24


def test_strict_mode_names_file_line_and_field(ray_session, tmp_path):
    sources = f"[{{path: '{BAD / 'mixed.jsonl'}'}}]"
    with pytest.raises(ValueError, match=r"mixed\.jsonl:2.*invalid_utf8"):
        _run(tmp_path, [f"data.sources={sources}", "data.strict=true"])


def test_stage_through_runner_writes_manifest_and_rerun_skips(ray_session, tmp_path):
    cfg = load_config(REPO / "configs" / "smoke.yaml", [f"run.root={tmp_path}", "tracking.enabled=false"])
    lines = []
    manifests = runner.run_pipeline(cfg, stages=("data",), log=lines.append)
    outputs = manifests["data"].outputs
    assert set(outputs) == {"train", "validation", "quarantine", "stats"}
    assert all(Path(p).exists() for p in outputs.values())
    train = pd.read_parquet(outputs["train"])
    assert {"id", "chosen_ids", "rejected_ids", "chosen_len", "rejected_len", "chosen_scored",
            "rejected_scored", "subset", "margin", "source", "location", "truncated"} <= set(train.columns)
    assert len(train) == 64 and len(pd.read_parquet(outputs["validation"])) == 32  # synthetic keeps its split
    runner.run_pipeline(cfg, stages=("data",), log=lines.append)
    assert any("up to date" in line for line in lines)
