"""Data stage on real public files and on a corpus of bad rows, through Ray Data."""

import json
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
    assert set(outputs) == {"train", "validation", "quarantine", "stats", "datasets"}
    assert all(Path(p).exists() for p in outputs.values())
    train = pd.read_parquet(outputs["train"])
    assert {"id", "chosen_ids", "rejected_ids", "chosen_len", "rejected_len", "chosen_scored",
            "rejected_scored", "subset", "margin", "source", "location", "truncated"} <= set(train.columns)
    assert len(train) == 64 and len(pd.read_parquet(outputs["validation"])) == 32  # synthetic keeps its split
    runner.run_pipeline(cfg, stages=("data",), log=lines.append)
    assert any("up to date" in line for line in lines)


# ---------------------------------------------------------------- public schemas, splits, order, margins, lineage

FORMATS = REPO / "tests" / "data" / "formats"


def _good(result):
    return pd.concat([pd.read_parquet(result.outputs[s]).assign(split=s) for s in ("train", "validation")])


def _stats_of(result):
    import json

    return json.loads(Path(result.outputs["stats"]).read_text())


def test_the_papers_unified_feedback_config_reads_its_data(ray_session, tmp_path):
    """configs/paper/*-unified-feedback.yaml read llm-blender/Unified-Feedback through datasets; here the same
    source points at a save_to_disk copy of fixture rows in that schema (a tiny Gemma stands in for gemma-2b-it)."""
    import datasets

    from pipeline.decoders import make_decoder

    rows = [json.loads(line) for line in (FORMATS / "unified_feedback.jsonl").read_text().splitlines()]
    folder = tmp_path / "unified-feedback"
    datasets.DatasetDict({"train": datasets.Dataset.from_list(rows)}).save_to_disk(str(folder))
    cfg = load_config(REPO / "configs" / "paper" / "gemma-2b-it-unified-feedback.yaml", [
        f"model.name_or_path={make_decoder(tmp_path / 'gemma', 'gemma')}", "data.max_length=512",
        f"data.sources=[{{hf: '{folder}', name: all, split: train, format: auto}}]"])
    out = tmp_path / "data"
    out.mkdir()
    result = prepare_preferences(runner.StageContext(cfg=cfg, run_dir=tmp_path, out_dir=out, upstream={},
                                                     tracker=tracking.RunLogger(None, None), log=lambda _: None))
    good = _good(result)
    assert len(good) == 4 and _stats_of(result)["quarantine"]["by_reason"] == {"tie": 2}
    # the rating differences as shares of each sub-source's rating range: Nectar 3 of 6, Argilla's mean 2.25 of 4,
    # arena and HH 1 of 1
    assert sorted(good["margin"]) == [0.5, 0.5625, 1.0, 1.0]


def test_ultrafeedback_pairing_and_each_unified_feedback_sub_sources_margins_are_counted_in_stats(ray_session,
                                                                                                   tmp_path):
    """UltraFeedback rows pair the best completion with one rated below it; a row with none below is quarantined and
    counted; the mixed Unified-Feedback margins land on one 0-1 scale, shown per sub-source."""
    uf = [json.loads(line) for line in (FORMATS / "ultrafeedback_raw.jsonl").read_text().splitlines()]
    flat = json.loads(json.dumps(uf[0]))
    for completion in flat["completions"]:
        completion["overall_score"] = 7.0
    path = tmp_path / "ultrafeedback.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in [*uf, dict(flat, instruction="Say hi.")]))
    mixed = FORMATS / "unified_feedback_all.jsonl"
    result = _run(tmp_path, [f"data.sources=[{{path: '{path}'}}, {{path: '{mixed}'}}]", "loss.use_margin=true"])
    stats = _stats_of(result)
    assert stats["pairing"][str(path)] == {"policy": "auto", "aspect": "overall", "pairs": len(uf),
                                           "rows_with_pairs": len(uf), "rows_without_lower_rated": 1}
    assert stats["quarantine"]["by_reason"] == {"no_lower_rated": 1}
    by_subset = stats["margins"]["by_subset"]
    assert by_subset["berkeley-nest/Nectar"] == {"pairs": 1, "with_margin": 1, "max": pytest.approx(5 / 6)}
    assert len(by_subset) == 8 and all(0 < v["max"] <= 1 for v in by_subset.values())


def test_prompts_stay_on_one_side_and_weighted_copies_follow_their_original(ray_session, shared_data, tmp_path):
    hh = shared_data / "hh_rlhf" / "helpful_train_sample.jsonl"
    result = _run(tmp_path, [f"data.sources=[{{path: '{hh}', weight: 2.5}}]", "data.validation_fraction=0.3"])
    good = _good(result)
    from pipeline import formats

    lines = {f"{hh}:{i}": json.loads(line) for i, line in enumerate(hh.read_text().splitlines(), 1)}
    prompts = {}
    for location, split in zip(good["location"], good["split"], strict=True):
        record, _ = formats.normalise_row(lines[location], source="s", location=location)
        prompts.setdefault(formats.prompt_key(record[0]["prompt"]), set()).add(split)
    assert all(len(sides) == 1 for sides in prompts.values()), "a prompt's pairs all land on one side"
    assert _stats_of(result)["split"]["prompts_on_both_sides"] == 0
    originals = good[~good["id"].str.contains("#w")].set_index("id")["split"]
    copies = good[good["id"].str.contains("#w")]
    assert len(copies) > len(originals)  # weight 2.5: one or two extra copies of each pair
    assert all(originals[i.split("#w")[0]] == s for i, s in zip(copies["id"], copies["split"], strict=True))


def test_limit_and_order_are_the_same_across_reruns_with_different_actor_counts(ray_session, shared_data, tmp_path):
    hh = shared_data / "hh_rlhf" / "helpful_train_sample.jsonl"
    runs = [_good(_run(tmp_path / f"actors{n}", [f"data.sources=[{{path: '{hh}', limit: 150}}]",
                                                  f"data.max_actors={n}", "data.batch_size=16"])) for n in (1, 2)]
    assert runs[0]["id"].tolist() == runs[1]["id"].tolist(), "the same rows, in the same order"
    from pipeline import formats

    first_good = [where for where, row in formats.iter_file_rows(hh.read_bytes(), str(hh))
                  if formats.normalise_row(row, source="s", location=where)[0]][:150]
    assert sorted(runs[0]["location"]) == sorted(first_good), "limit keeps the first 150 good rows in file order"
    train = runs[0][runs[0]["split"] == "train"]
    order = [int(loc.rsplit(":", 1)[1]) for loc in train["location"]]
    assert order != sorted(order), "the train split is globally shuffled, not in file order"


def test_margins_are_never_dropped_silently(ray_session, shared_data, tmp_path):
    hh = shared_data / "hh_rlhf" / "helpful_train_sample.jsonl"
    source = f"data.sources=[{{path: '{hh}', limit: 40}}]"
    with pytest.raises(ValueError, match=r"loss.use_margin=true but 40 pair\(s\) have no margin"):
        _run(tmp_path / "error", [source, "loss.use_margin=true"])
    result = _run(tmp_path / "zero", [source, "loss.use_margin=true", "data.missing_margin=zero"])
    assert (_good(result)["margin"] == 0.0).all()
    assert _stats_of(result)["margins"] == {"use_margin": True, "missing": 40, "policy": "zero", "by_subset": {}}


def test_an_unseen_schema_loads_with_a_column_mapping_and_a_wrong_one_names_the_column_and_file(ray_session, tmp_path):
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("".join(json.dumps({"question": f"What is {i} + {i}?", "better": f"{2 * i}.",
                                         "worse": f"{2 * i + 1}.", "uid": i}) + "\n" for i in range(12)))
    mapping = "{prompt: question, chosen: better, rejected: worse, id: uid}"
    good = _good(_run(tmp_path / "ok", [f"data.sources=[{{path: '{pairs}', columns: {mapping}}}]"]))
    assert sorted(good["id"].astype(int)) == list(range(12))
    wrong = "{prompt: question, chosen: best, rejected: worse}"
    with pytest.raises(ValueError, match=r"data.sources\[0\].columns does not fit .*pairs.jsonl: column 'best'"):
        _run(tmp_path / "bad", [f"data.sources=[{{path: '{pairs}', columns: {wrong}}}]"])


def test_benchmark_prompts_in_train_are_counted_and_can_be_dropped(ray_session, tmp_path):
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("".join(json.dumps({"prompt": f"Question {i}?", "chosen": "Yes.", "rejected": "No."}) + "\n"
                             for i in range(30)))
    bench = tmp_path / "bench.jsonl"
    bench.write_text("".join(json.dumps({"prompt": f"question   {i}?", "chosen": "a", "rejected": "b"}) + "\n"
                             for i in range(10)))  # the same prompts up to case and spacing
    common = [f"data.sources=[{{path: '{pairs}'}}]", f"rewardbench.benchmarks=[{{name: b, path: '{bench}'}}]",
              "data.validation_fraction=0.2"]
    counted = _stats_of(_run(tmp_path / "count", common))["contamination"]
    assert counted["benchmark_prompts"] == 10 and 0 < counted["train_pairs"] <= 10
    dropped = _run(tmp_path / "drop", [*common, "data.decontaminate=true"])
    assert _stats_of(dropped)["quarantine"]["by_reason"] == {"contaminated": counted["train_pairs"]}
    lines = {int(loc.rsplit(":", 1)[1]) - 1 for loc in _good(dropped).query("split == 'train'")["location"]}
    assert lines and not lines & set(range(10)), "no train pair keeps a benchmark prompt"


def test_a_weight_below_one_and_decontamination_count_every_pair_they_leave_out(ray_session, tmp_path):
    pairs = tmp_path / "pairs.jsonl"
    lines = [json.dumps({"prompt": f"Question {i}?", "chosen": "Yes.", "rejected": "No."}) for i in range(40)]
    pairs.write_text("\n".join(lines[:20] + ["{not json"] + lines[20:]) + "\n")
    bench = tmp_path / "bench.jsonl"
    bench.write_text("".join(json.dumps({"prompt": f"Question {i}?", "chosen": "a", "rejected": "b"}) + "\n"
                             for i in range(40)))
    result = _run(tmp_path, [f"data.sources=[{{path: '{pairs}', weight: 0.5}}]", "data.decontaminate=true",
                             f"rewardbench.benchmarks=[{{name: b, path: '{bench}'}}]"])
    reasons = _stats_of(result)["quarantine"]["by_reason"]
    good = _good(result)
    assert reasons["invalid_json"] == 1 and reasons["subsampled"] > 0 and reasons["contaminated"] > 0
    assert len(good) + sum(reasons.values()) == 41, "every row is trained on or counted with its reason"
    assert (good["split"] == "validation").all(), "every train prompt was a benchmark prompt"
