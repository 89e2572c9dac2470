"""Bigger models: precision whatever the checkpoint's dtype, activation checkpointing and attention kernels that
leave the model unchanged, the memory plan, offload."""

from __future__ import annotations

import pytest
import torch

from pipeline import modeling
from pipeline.config import load_config


@pytest.fixture(scope="module")
def bf16_decoder(tmp_path_factory):
    """A tiny llama decoder saved the way hub checkpoints are: bf16 safetensors (config.json says bfloat16)."""
    from transformers import AutoModelForCausalLM

    from pipeline.decoders import make_decoder

    folder = make_decoder(tmp_path_factory.mktemp("bf16-llama"), "llama")
    AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).to(torch.bfloat16).save_pretrained(folder)
    return folder


def _engine(folder: str, precision: str, zero: int = 2):
    from pipeline.train_loop import LoopPlan, build_engine, single_process_env

    single_process_env(one_process=True)
    cfg = load_config(None, [f"model.name_or_path={folder}", f"train.precision={precision}",
                             f"train.zero_stage={zero}", "train.num_workers=1"])
    return build_engine(cfg, LoopPlan(max_steps=2, steps_per_epoch=2, world_size=1, rank=0), use_gpu=False)


@pytest.mark.integration
@pytest.mark.timeout(300)
def test_fp32_trains_fp32_and_bf16_keeps_fp32_master_weights_from_a_bf16_checkpoint(bf16_decoder):
    engine, model, _ = _engine(bf16_decoder, "fp32")
    dtypes = {p.dtype for p in model.parameters()}
    assert dtypes == {torch.float32}, f"train.precision=fp32 trains in {dtypes} from a bf16 checkpoint"
    engine, model, _ = _engine(bf16_decoder, "bf16")
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    masters = engine.optimizer.single_partition_of_fp32_groups  # ZeRO-2's master partitions
    assert masters and {m.dtype for m in masters} == {torch.float32}
