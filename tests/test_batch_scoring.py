"""``run_pipeline.py score``: a file of conversations and pairs scored on Ray Data with training's encoding, bad rows
quarantined with their reasons."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest

import run_pipeline
from pipeline import serving
from tests import chat_styles

pytestmark = pytest.mark.integration
REPO = Path(__file__).resolve().parents[1]
CONVERSATION = [{"role": "user", "content": "What is 6 times 7?"}, {"role": "assistant", "content": "42."}]


def test_score_command_scores_conversations_and_real_pairs_and_quarantines_bad_rows(ray_session, shared_data,
                                                                                     tmp_path):
    folder = chat_styles.reward_model_folder("llama3", tmp_path / "rm", seed=4)
    hh = [json.loads(line) for line in (shared_data / "hh_rlhf" / "helpful_train_sample.jsonl").open()][:3]
    lines = [json.dumps({"messages": CONVERSATION}), *map(json.dumps, hh),
             json.dumps({"messages": [{"role": "user", "content": "Hi"}]}), "{not json"]
    source = tmp_path / "in.jsonl"
    source.write_text("\n".join(lines) + "\n")
    out = tmp_path / "scores.parquet"
    rc = run_pipeline.main(["score", "--model", folder, "--input", str(source), "--output", str(out),
                            "--config", str(REPO / "configs" / "smoke.yaml")])
    assert rc == 0
    frame = pd.read_parquet(out)
    assert frame["kind"].tolist() == ["conversation", "pair", "pair", "pair"]
    assert frame["location"].tolist() == [f"{source}:{i}" for i in (1, 2, 3, 4)]
    quarantined = [json.loads(line) for line in Path(f"{out}.quarantine.jsonl").read_text().splitlines()]
    assert [(q["location"], q["reason"]) for q in quarantined] == [(f"{source}:5", "broken_transcript"),
                                                                   (f"{source}:6", "invalid_json")]
    service = serving.RewardService(folder, max_length=2048, truncation_side="left")
    (ids, _), = service.encode_conversations([CONVERSATION])
    assert frame.loc[0, "reward"] == pytest.approx(service.rewards([ids])[0], abs=1e-5)
    assert (frame.loc[1:, "margin"] == frame.loc[1:, "chosen_reward"] - frame.loc[1:, "rejected_reward"]).all()
    assert frame.loc[1:, "chosen_reward"].notna().all() and frame.loc[1:, "reward"].isna().all()
