"""LoRA under DeepSpeed: two ranks over gloo (as under ``torchrun``, no Ray), ZeRO-2 then ZeRO-3 (pretrained
weights loaded straight into ZeRO-3 partitions, the head copied by PEFT under a gather); the loss curves agree and
every export (merged from ZeRO-2's whole weights and from ZeRO-3's consolidated ones, adapter + head from ZeRO-3)
scores the validation pairs as the training engine scored them at the end of training."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from tests.test_zero_stages import N_VALIDATION, WORLD, _free_port, _pairs

pytestmark = [pytest.mark.integration, pytest.mark.timeout(600)]
STEPS = 3
RUNS = [(2, "merged"), (3, "merged"), (3, "adapter")]


def _rank(rank: int, port: int, model: str, out: str) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(WORLD), LOCAL_WORLD_SIZE=str(WORLD),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), DS_ACCELERATOR="cpu", HF_HUB_OFFLINE="1")
    from pipeline import modeling
    from pipeline.config import load_config
    from pipeline.train_loop import VALIDATION_REWARDS, train_local

    tok = modeling.load_tokenizer(model)
    train, _ = _pairs(tok, "train", 32)
    validation, _ = _pairs(tok, "validation", N_VALIDATION)
    for stage, export in RUNS:
        history: list[dict] = []
        folder = Path(out) / f"zero{stage}-{export}"

        def report(metrics, checkpoint_dir=None, final=False, folder=folder, history=history):
            history.append({k: v for k, v in metrics.items() if isinstance(v, (int, float))})
            if final and rank == 0:
                shutil.copytree(Path(checkpoint_dir) / "model", folder / "model")
                shutil.copy(Path(checkpoint_dir) / VALIDATION_REWARDS, folder / VALIDATION_REWARDS)
                (folder / "history.json").write_text(json.dumps(history))

        cfg = load_config(None, [f"model.name_or_path={model}", f"train.zero_stage={stage}", f"train.max_steps={STEPS}",
                                 "train.micro_batch_size=4", "train.log_every=1", "train.lr=1e-3", "loss.name=normbt",
                                 "lora.r=4", "lora.alpha=8", f"lora.export={export}"])
        train_local(cfg, train, validation, report=report)


# The decoders (pipeline.decoders' tiny Llama, Qwen2 and Gemma: byte-level BPE, pad = EOS) take about 85 s each on
# 2 cores: the slow tier.
@pytest.mark.parametrize("model", ["embedded:minilm", *(pytest.param(f, marks=pytest.mark.slow)
                                                        for f in ("llama", "qwen2", "gemma"))])
def test_lora_zero2_and_zero3_agree_and_every_export_scores_like_training(model, tmp_path):
    import pandas as pd

    from pipeline import lora, modeling
    from pipeline.decoders import make_decoder

    name = model if model.startswith("embedded:") else make_decoder(tmp_path / "base", model)
    mp.start_processes(_rank, args=(_free_port(), name, str(tmp_path)), nprocs=WORLD, start_method="spawn", join=True)
    runs = {f"zero{s}-{e}": tmp_path / f"zero{s}-{e}" for s, e in RUNS}
    curves = {k: [(h["loss"], h["mu"]) for h in json.loads((f / "history.json").read_text()) if "loss" in h]
              for k, f in runs.items()}
    assert len(curves["zero2-merged"]) == STEPS
    for key in ("zero3-merged", "zero3-adapter"):
        torch.testing.assert_close(torch.tensor(curves[key]), torch.tensor(curves["zero2-merged"]), rtol=1e-5,
                                   atol=1e-6, msg=f"{key} loss/mu curve")
    final = json.loads((runs["zero3-merged"] / "history.json").read_text())[-1]
    assert final["lora/r"] == 4 and 0 < final["params/trainable"] < final["params/total"] / 10

    tok = modeling.load_tokenizer(name)
    rows, _ = _pairs(tok, "validation", N_VALIDATION)
    batch = modeling.collate_pairs([r["chosen_ids"] for r in rows], [r["rejected_ids"] for r in rows],
                                   tok.pad_token_id)
    for key, folder in runs.items():
        assert lora.is_adapter_export(folder / "model") == key.endswith("adapter")
        loaded, _ = modeling.load_exported(folder / "model")
        with torch.no_grad():
            rewards = modeling.forward_rewards(loaded, batch["input_ids"], batch["attention_mask"])[0].double()
        trained = pd.read_parquet(folder / "validation_rewards.parquet")
        expected = trained[["reward_chosen", "reward_rejected"]].to_numpy().T.reshape(-1)
        torch.testing.assert_close(rewards, torch.tensor(expected), rtol=1e-5, atol=1e-5, msg=key)


def test_lora_run_restored_from_a_checkpoint_ends_at_the_uninterrupted_weights(tmp_path, capsys):
    """What a killed worker's replacement does (Ray Train hands it the last checkpoint): DeepSpeed's checkpoint of
    a LoRA model (adapters, trained head, optimizer state, μ, RNG) restores the run exactly. One process, no Ray."""
    from safetensors.torch import load_file

    from pipeline import modeling
    from pipeline.config import load_config
    from pipeline.decoders import make_decoder
    from pipeline.train_loop import train_local

    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    name = make_decoder(tmp_path / "base", "llama")
    tok = modeling.load_tokenizer(name)
    train, _ = _pairs(tok, "train", 32)
    validation, _ = _pairs(tok, "validation", N_VALIDATION)
    cfg = load_config(None, [f"model.name_or_path={name}", "train.max_steps=4", "train.checkpoint_every=2",
                             "train.micro_batch_size=4", "train.num_workers=1", "train.lr=1e-3", "lora.r=4"])

    def run(out: Path, restore: str | None = None) -> dict[str, torch.Tensor]:
        def report(metrics, checkpoint_dir=None, final=False):
            if checkpoint_dir and metrics.get("step") == 2 and not final:
                shutil.copytree(checkpoint_dir, out / "step2")
            if final:
                shutil.copytree(Path(checkpoint_dir) / "model", out / "model")
        train_local(cfg, train, validation, report=report, restore_dir=restore, one_process=True)
        return load_file(str(out / "model" / "model.safetensors"))

    straight = run(tmp_path / "straight")
    resumed = run(tmp_path / "resumed", restore=str(tmp_path / "straight" / "step2"))
    assert "resumed from the checkpoint at step 2" in capsys.readouterr().out
    assert straight.keys() == resumed.keys() and not any("lora" in k for k in straight)
    for key in straight:
        torch.testing.assert_close(resumed[key], straight[key], rtol=0, atol=1e-7, msg=key)


def test_lora_with_gradient_checkpointing_trains_the_same_steps(tmp_path, monkeypatch):
    """Activation checkpointing on a LoRA model (PEFT's wrapper around the layers; a frozen backbone whose
    embeddings' output needs no grad): the build finds layers to checkpoint (it raises otherwise), and each step's
    loss, μ and gradient norm equal the run without checkpointing."""
    from pipeline import modeling
    from pipeline.config import load_config
    from pipeline.decoders import make_decoder
    from pipeline.train_loop import train_local

    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    name = make_decoder(tmp_path / "base", "llama")
    tok = modeling.load_tokenizer(name)
    train, _ = _pairs(tok, "train", 32)
    validation, _ = _pairs(tok, "validation", N_VALIDATION)

    def curve(*extra: str) -> list[tuple[float, ...]]:
        cfg = load_config(None, [f"model.name_or_path={name}", "train.max_steps=3", "train.micro_batch_size=4",
                                 "train.num_workers=1", "train.lr=1e-3", "train.log_every=1", "loss.name=normbt",
                                 "lora.r=4", "model.attn_implementation=eager", *extra])
        history: list[dict] = []
        train_local(cfg, train, validation, one_process=True,
                    report=lambda metrics, checkpoint_dir=None, final=False: history.append(metrics))
        return [(h["loss"], h["mu"], h["grad_norm"]) for h in history if "loss" in h]

    import transformers.modeling_utils as hf_modeling

    calls: list[int] = []
    recompute = hf_modeling.checkpoint  # what transformers binds into every layer's checkpointing function
    monkeypatch.setattr(hf_modeling, "checkpoint", lambda *a, **k: calls.append(1) or recompute(*a, **k))
    plain = curve()
    assert not calls
    checkpointed = curve("train.gradient_checkpointing=true")
    assert calls, "no layer ran under activation checkpointing"
    assert len(plain) == 3 and all(g > 0 for _, _, g in plain)
    torch.testing.assert_close(torch.tensor(checkpointed), torch.tensor(plain), rtol=1e-5, atol=1e-6)
