"""CUDA paths (bf16, NCCL, GPU actors). Skipped without CUDA; run on a GPU node with `pytest -m gpu`."""

from pathlib import Path

import pytest
import torch

from pipeline import modeling, synthetic
from pipeline.config import load_config

pytestmark = [pytest.mark.gpu, pytest.mark.timeout(900)]
REPO = Path(__file__).resolve().parents[1]


def _rows(n):
    tok = modeling.load_tokenizer("tiny:llama")
    rows = []
    for r in synthetic.generate(synthetic.SyntheticSpec(n_train=n), "train"):
        c = modeling.encode_messages(tok, r["prompt"] + r["chosen"])
        j = modeling.encode_messages(tok, r["prompt"] + r["rejected"])
        rows.append({"chosen_ids": c, "rejected_ids": j, "chosen_len": len(c), "rejected_len": len(j), "margin": None})
    return rows


@pytest.mark.parametrize("zero", [2, 3])
def test_train_loop_on_cuda_in_bf16(zero):
    """The worker loop without Ray, as under torchrun: bf16 DeepSpeed on one GPU (NCCL process group)."""
    from pipeline.train_loop import train_local

    history = []
    cfg = load_config(REPO / "configs" / "smoke.yaml", ["train.use_gpu=true", "train.precision=auto",
                                                        f"train.zero_stage={zero}", "train.max_steps=3"])
    rows = _rows(64)
    train_local(cfg, rows, rows[:16], report=lambda m, checkpoint_dir=None, final=False: history.append(m))
    losses = [h["loss"] for h in history if "loss" in h]
    assert len(losses) == 3 and all(torch.isfinite(torch.tensor(losses)))


def test_scorer_runs_in_bf16_on_cuda(tmp_path):
    from pipeline.scoring import score_locally

    tok = modeling.load_tokenizer("tiny:llama")
    folder = modeling.save_reward_model(modeling.build_reward_model("tiny:llama", tok), tok, tmp_path / "rm")
    rows = [{"messages": [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}], "i": 0}]
    out = score_locally(rows, str(folder), use_gpu=True)
    assert torch.isfinite(torch.tensor(out["score"].tolist())).all()
