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


def _engine(folder: str, precision: str, zero: int = 2, extra: tuple[str, ...] = ()):
    from pipeline.train_loop import LoopPlan, build_engine, single_process_env

    single_process_env(one_process=True)
    cfg = load_config(None, [f"model.name_or_path={folder}", f"train.precision={precision}",
                             f"train.zero_stage={zero}", "train.num_workers=1", *extra])
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


@pytest.mark.integration
@pytest.mark.timeout(300)
def test_offload_reaches_deepspeed_with_the_plain_torch_optimizer_on_cpu(bf16_decoder):
    """On CPU the offloaded partition is stepped by torch's AdamW (DeepSpeed's CPU Adam would JIT-compile);
    that the curve is unchanged is checked with 2 ranks below."""
    engine, _, _ = _engine(bf16_decoder, "fp32", zero=2, extra=("train.offload_optimizer=true",))
    assert engine.zero_cpu_offload() and engine.optimizer.cpu_offload
    assert isinstance(engine.optimizer.optimizer, torch.optim.AdamW)
    engine, _, _ = _engine(bf16_decoder, "fp32", zero=3, extra=("train.offload_optimizer=true",
                                                                "train.offload_params=true"))
    assert engine.zero_offload_param() is not None and engine.zero_offload_optimizer() is not None


@pytest.mark.integration
@pytest.mark.timeout(300)
def test_packing_refuses_an_encoder_naming_the_key():
    with pytest.raises(ValueError, match="train.packing applies to decoders only"):
        _engine("embedded:minilm", "fp32", extra=("train.packing=true",))


@pytest.fixture(scope="module")
def decoders(tmp_path_factory):
    from pipeline.decoders import make_decoder

    return {f: make_decoder(tmp_path_factory.mktemp(f), f) for f in ("llama", "qwen2", "gemma")}


def _pair_sequences(tok, vocab_size: int, n_pairs: int = 3, seed: int = 0) -> list[list[int]]:
    """Chosen then rejected sequences of unequal lengths from the model's vocabulary; one ends in EOS (= pad),
    which scoring skips, as real chat-templated data does."""
    g = torch.Generator().manual_seed(seed)
    vocab = [i for i in range(vocab_size) if i != tok.pad_token_id]
    seqs = [[vocab[int(j)] for j in torch.randint(len(vocab), (int(n),), generator=g)]
            for n in torch.randint(4, 14, (2 * n_pairs,), generator=g)]
    seqs[1].append(tok.pad_token_id)
    return seqs


def _pair_batch(tok, vocab_size: int, n_pairs: int = 3, packed: bool = False) -> dict[str, torch.Tensor]:
    seqs = _pair_sequences(tok, vocab_size, n_pairs)
    join = modeling.pack_pairs if packed else modeling.collate_pairs
    return join(seqs[:n_pairs], seqs[n_pairs:], tok.pad_token_id)


def _loss_and_grads(model, batch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    from pipeline import losses

    model.zero_grad(set_to_none=True)
    rc, rr, hc, hr = modeling.forward_pairs(model, batch)
    loss, _ = losses.normbt_loss(rc, rr, hc, hr, mu=0.7, eps=1e-3)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _counting_checkpoints(model) -> list[int]:
    """Counts calls of each layer's checkpoint function: proof that checkpointing engaged, not just its flag."""
    calls = [0]
    for layer in model.modules():
        inner = getattr(layer, "_gradient_checkpointing_func", None)
        if inner is not None and not hasattr(layer, "config"):
            def counted(*args, _inner=inner, **kwargs):
                calls[0] += 1
                return _inner(*args, **kwargs)
            layer._gradient_checkpointing_func = counted
    return calls


@pytest.mark.unit
@pytest.mark.parametrize("family", ["llama", "qwen2", "gemma"])
def test_checkpointing_attention_kernels_and_packing_leave_loss_and_gradients_unchanged(family, decoders):
    from transformers import AutoConfig

    tok = modeling.load_tokenizer(decoders[family])
    vocab = AutoConfig.from_pretrained(decoders[family]).vocab_size
    batch, packed = _pair_batch(tok, vocab), _pair_batch(tok, vocab, packed=True)
    assert packed["input_ids"].shape[0] == 1 and int((batch["attention_mask"] == 0).sum()) > 0
    build = lambda kernel: modeling.build_reward_model(decoders[family], tok, dtype=torch.float32,
                                                       attn_implementation=kernel)
    loss, grads = _loss_and_grads(build("sdpa"), batch)
    checkpointed = modeling.enable_checkpointing(build("sdpa"))
    calls = _counting_checkpoints(checkpointed)
    assert modeling.checkpointed_layers(checkpointed) == 2 and not checkpointed.model.layers[0].self_attn.training
    runs = {"sdpa+checkpointing": _loss_and_grads(checkpointed, batch), "eager": _loss_and_grads(build("eager"), batch),
            "packed sdpa": _loss_and_grads(build("sdpa"), packed), "packed eager": _loss_and_grads(build("eager"), packed)}
    assert calls[0] == 2, "checkpointing never engaged (layers in eval mode skip it)"
    for name, (other_loss, other_grads) in runs.items():
        torch.testing.assert_close(other_loss, loss, rtol=1e-5, atol=1e-5, msg=f"{family} {name} loss")
        assert other_grads.keys() == grads.keys()
        for key in grads:
            torch.testing.assert_close(other_grads[key], grads[key], rtol=1e-5, atol=1e-5, msg=f"{family} {name} {key}")


@pytest.mark.unit
def test_checkpointing_engages_in_eval_mode_only_through_the_layer_flags(decoders):
    tok = modeling.load_tokenizer(decoders["llama"])
    model = modeling.enable_checkpointing(modeling.build_reward_model(decoders["llama"], tok))
    assert modeling.checkpointed_layers(model) == 2
    model.eval()  # what DeepSpeed's engine.eval() does: the flags are gone, so the loop engages them again
    assert modeling.checkpointed_layers(model) == 0
    assert modeling.checkpointed_layers(modeling.engage_checkpointing(model)) == 2
    assert all(not m.training for m in model.modules() if isinstance(m, torch.nn.Dropout))


@pytest.mark.unit
def test_flash_attention_without_a_gpu_or_the_package_fails_preflight_naming_the_key():
    import importlib.util

    from pipeline.preflight import problems

    on_cpu = load_config(None, ["model.attn_implementation=flash_attention_2"])
    assert any("flash_attention_2 runs on GPU only" in p for p in problems(on_cpu, ("train",)))
    if importlib.util.find_spec("flash_attn") is None:
        on_gpu = load_config(None, ["model.attn_implementation=flash_attention_2", "train.use_gpu=true"])
        assert any("needs the flash-attn package" in p for p in problems(on_gpu, ("train",)))
    assert not any("attn_implementation" in p for p in problems(load_config(None, []), ("train",)))


def _rank(rank: int, port: int, model: str, runs: dict[str, list[str]], out: str) -> None:
    """One of 2 gloo ranks (as under torchrun): every run of ``runs`` in turn; rank 0 writes each history."""
    import json
    import os
    from pathlib import Path

    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", LOCAL_WORLD_SIZE="2",
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), DS_ACCELERATOR="cpu", HF_HUB_OFFLINE="1")
    from pipeline.train_loop import train_local
    from tests.test_zero_stages import _pairs

    tok = modeling.load_tokenizer(model)
    train, _ = _pairs(tok, "train", 32)
    validation, _ = _pairs(tok, "validation", 9)
    for name, overrides in runs.items():
        history: list[dict] = []
        report = lambda m, checkpoint_dir=None, final=False, h=history: h.append(
            {k: v for k, v in m.items() if isinstance(v, (int, float)) and not k.startswith(("phase/", "pairs_",
                                                                                              "tokens_", "data_"))})
        cfg = load_config(None, [f"model.name_or_path={model}", "train.max_steps=3", "train.micro_batch_size=4",
                                 "train.log_every=1", "train.lr=1e-4", "loss.name=normbt", *overrides])
        train_local(cfg, train, validation, report=report)
        if rank == 0:
            Path(out, f"{name}.json").write_text(json.dumps(history))


@pytest.mark.integration
@pytest.mark.timeout(600)
@pytest.mark.parametrize("family", ["llama", "qwen2", "gemma"])
def test_checkpointing_eager_attention_packing_and_offload_give_the_plain_loss_curve_under_zero2_and_zero3(
        decoders, tmp_path, family):
    """2 ranks, fp32: the loss/μ curve and the validation metrics of the plain sdpa run, to 1e-5. Every setting on
    tiny llama; on qwen2 and gemma the kernel, checkpointing and packing under ZeRO-2 and ZeRO-3 (offload is the
    optimizer's business, not the architecture's)."""
    import json
    import socket

    import torch.multiprocessing as mp

    runs = {"plain": ["train.zero_stage=2"],
            "zero2-checkpointing-eager": ["train.zero_stage=2", "train.gradient_checkpointing=true",
                                          "model.attn_implementation=eager"],
            "zero2-offload": ["train.zero_stage=2", "train.offload_optimizer=true"],
            "zero2-packing": ["train.zero_stage=2", "train.packing=true"],
            "zero3-packing-checkpointing": ["train.zero_stage=3", "train.packing=true", "train.gradient_checkpointing=true"],
            "zero3-offload-all": ["train.zero_stage=3", "train.offload_optimizer=true", "train.offload_params=true"]}
    if family != "llama":
        runs = {k: v for k, v in runs.items() if "offload" not in k}
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.start_processes(_rank, args=(port, decoders[family], runs, str(tmp_path)), nprocs=2, start_method="spawn")
    history = {name: json.loads((tmp_path / f"{name}.json").read_text()) for name in runs}
    plain = history["plain"]
    assert len([h for h in plain if "loss" in h]) == 3 and "val_accuracy" in plain[-1]
    assert all(h["padding_fraction"] > 0 for h in plain if "loss" in h)
    assert all(h["padding_fraction"] == 0 for h in history["zero2-packing"] if "loss" in h)
    for name in runs.keys() - {"plain"}:
        assert [sorted(h) for h in history[name]] == [sorted(h) for h in plain]
        for got, want in zip(history[name], plain, strict=True):
            for key in want.keys() - {"padding_fraction"}:  # the one thing packing changes
                assert got[key] == pytest.approx(want[key], rel=1e-5, abs=1e-5), f"{name}: {key}"


# ------------------------------------------------------------------ the memory plan


@pytest.mark.integration  # no Ray, but importing DeepSpeed takes about 10 s on 2 cores
def test_plan_model_states_equal_deepspeeds_estimators_for_every_zero_stage():
    """The plan counts parameters on the meta device; DeepSpeed's estimators get the counts of the real model."""
    from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs, model_to_params
    from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs

    from pipeline.memory_plan import model_shape, model_state_bytes

    tok = modeling.load_tokenizer("tiny:llama")
    total, largest = model_to_params(modeling.build_reward_model("tiny:llama", tok))
    shape = model_shape("tiny:llama")
    assert (shape.parameters, shape.largest_layer_parameters) == (total, largest)
    ours = lambda stage, n, **kw: model_state_bytes(total, largest, zero_stage=stage, world_size=n,
                                                    bf16=True, **kw)
    close = lambda a, b: abs(a - b) <= 0.05 * b
    for n in (1, 2, 8):
        for offload in (False, True):
            _, theirs = estimate_zero2_model_states_mem_needs(total, num_gpus_per_node=n, cpu_offload=offload)
            assert close(ours(2, n, offload_optimizer=offload), theirs), f"ZeRO-2 n={n} offload={offload}"
        for offload, params in ((False, False), (True, False), (True, True)):
            _, theirs, _ = estimate_zero3_model_states_mem_needs(total, largest, num_gpus_per_node=n,
                                                                 cpu_offload=offload, cpu_offload_params=params)
            assert close(ours(3, n, offload_optimizer=offload, offload_params=params), theirs), f"ZeRO-3 n={n}"
    # ZeRO-0 and ZeRO-1 partition nothing / only the optimizer: on one GPU both are DeepSpeed's ZeRO-2 with one GPU
    _, single = estimate_zero2_model_states_mem_needs(total, num_gpus_per_node=1, cpu_offload=False)
    assert close(ours(0, 8), single) and close(ours(1, 1), single)
    assert ours(2, 8) < ours(1, 8) < ours(0, 8)


@pytest.mark.unit
def test_plan_activations_are_korthikantis_34sbh_plus_5as2b_for_gpt_shapes():
    from pipeline.memory_plan import ModelShape, activation_bytes

    s, b, h, a, layers = 2048, 8, 1024, 16, 4
    gpt = ModelShape(source="gpt", model_type="gpt", parameters=1, largest_layer_parameters=1, layers=layers,
                     hidden_size=h, heads=a, intermediate_size=4 * h, gated_mlp=False)
    kw = {"tokens": s, "sequences": b, "bf16": True}
    assert activation_bytes(gpt, eager=False, checkpointing=False, **kw) == layers * 34 * s * b * h
    assert activation_bytes(gpt, eager=True, checkpointing=False, **kw) == layers * (34 * s * b * h + 5 * a * s * s * b)
    assert activation_bytes(gpt, eager=False, checkpointing=True, **kw) == layers * 2 * s * b * h + 34 * s * b * h
    assert activation_bytes(gpt, eager=False, checkpointing=False, tokens=s, sequences=b, bf16=False) == \
        2 * layers * 34 * s * b * h


@pytest.mark.unit
def test_plan_json_has_the_documented_keys_and_the_shape_comes_from_a_config_only_folder(capsys):
    import json

    import run_pipeline

    rc = run_pipeline.main(["--config", "configs/paper/llama-3.2-3b-skywork.yaml", "--plan", "--json",
                            "model.name_or_path=configs/models/llama-3.2-3b", "train.gpu_memory_gb=80"])
    out = json.loads(capsys.readouterr().out)
    assert rc == 0 and {"parameters", "model_states_gb", "activations_gb", "total_gb", "fits"} <= out.keys()
    assert out["parameters"] == pytest.approx(3.21e9, rel=0.01) and out["fits"] is True  # Llama-3.2-3B: 3.21B
    assert out["total_gb"] == pytest.approx(out["model_states_gb"] + out["activations_gb"])


@pytest.mark.unit
def test_plan_says_when_it_cannot_know_the_gpu_memory_or_the_model(capsys, monkeypatch):
    import run_pipeline

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert run_pipeline.main(["--plan", "model.name_or_path=tiny:llama"]) == 0
    text = capsys.readouterr().out
    assert "fit unknown" in text and "set train.gpu_memory_gb" in text
    assert run_pipeline.main(["--plan", "model.name_or_path=/nonexistent/model"]) == 2
    assert "cannot read its config" in capsys.readouterr().err


@pytest.mark.unit
def test_train_stage_refuses_a_run_that_cannot_fit_naming_the_settings_that_would():
    from types import SimpleNamespace

    from stages.train import train_reward_model

    cfg = load_config("configs/paper/llama-3.2-3b-skywork.yaml",
                      ["model.name_or_path=configs/models/llama-3.1-8b", "train.gpu_memory_gb=80"])
    logged: list[str] = []
    with pytest.raises(RuntimeError, match="cannot fit") as err:
        train_reward_model(SimpleNamespace(cfg=cfg, upstream={}, log=logged.append))
    assert "train.gradient_checkpointing=true" in str(err.value)
    assert any("memory plan" in line for line in logged)


@pytest.mark.integration  # no Ray, but a fresh process importing transformers: about 15 s on 2 loaded cores
def test_gpu_check_shape_run_works_on_cpu_with_only_torch_and_transformers(tmp_path):
    """The GPU check's shape runs import nothing but torch, transformers (which brings PyYAML through
    huggingface_hub) and this repository: run them on CPU in a process where DeepSpeed, Ray and MLflow cannot be
    imported."""
    import json
    import subprocess
    import sys

    from transformers import LlamaConfig

    LlamaConfig(vocab_size=300, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2).save_pretrained(tmp_path)
    code = ("import sys, json; sys.modules.update(deepspeed=None, ray=None, mlflow=None)\n"
            "from benchmarks.gpu_check import shape_run\n"
            f"runs = [shape_run({str(tmp_path)!r}, tokens=16, pairs=2, checkpointing=c, device='cpu', steps=2, "
            "warmup=1, peak_tflops=1.0, packing=p) for c, p in ((False, False), (True, False), (True, True))]\n"
            "print(json.dumps(runs))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=False,
                         cwd=str(modeling.Path(__file__).resolve().parents[1]))
    assert out.returncode == 0, out.stderr[-2000:]
    runs = json.loads(out.stdout.strip().splitlines()[-1])
    assert [r["checkpointing"] for r in runs] == [False, True, True] and all(r["tokens_per_s"] > 0 for r in runs)
    assert runs[2]["packing"] and runs[2]["plan_activations_gib"] > runs[1]["plan_activations_gib"]  # sdpa's mask
    assert runs[1]["plan_activations_gib"] < runs[0]["plan_activations_gib"] and runs[0]["activation_peak_gib"] is None
    assert runs[0]["dtype"] == "float32" and runs[0]["mfu"] > 0


@pytest.mark.unit
def test_plan_packing_costs_the_rows_square_with_eager_and_sdpa_but_not_with_flash_attention():
    from pipeline.memory_plan import ModelShape, activation_bytes

    s, b, h, a = 512, 8, 256, 4
    shape = ModelShape(source="x", model_type="llama", parameters=1, largest_layer_parameters=1, layers=2,
                       hidden_size=h, heads=a, intermediate_size=4 * h, gated_mlp=False)
    kw = {"tokens": s, "sequences": b, "bf16": True, "checkpointing": False}
    padded = activation_bytes(shape, eager=False, **kw)
    assert activation_bytes(shape, eager=False, packed="flash_attention_2", **kw) == padded
    assert activation_bytes(shape, eager=False, packed="sdpa", **kw) == padded + (s * b) ** 2
    eager_packed = activation_bytes(shape, eager=True, packed="eager", **kw)
    assert eager_packed == 2 * 34 * s * b * h + 2 * 5 * a * (s * b) ** 2 + (s * b) ** 2


@pytest.mark.integration
@pytest.mark.timeout(300)
def test_checkpointing_under_zero3_resumes_to_the_uninterrupted_curve(decoders, tmp_path):
    """One process: a run resumed from its step-2 checkpoint ends where the uninterrupted run ends."""
    import shutil

    from pipeline.train_loop import train_local
    from tests.test_zero_stages import _pairs

    tok = modeling.load_tokenizer(decoders["llama"])
    train, _ = _pairs(tok, "train", 32)
    validation, _ = _pairs(tok, "validation", 9)
    cfg = load_config(None, [f"model.name_or_path={decoders['llama']}", "train.zero_stage=3", "train.max_steps=4",
                             "train.checkpoint_every=2", "train.micro_batch_size=4", "train.num_workers=1",
                             "train.gradient_checkpointing=true", "train.log_every=1", "train.lr=1e-4"])

    def run(restore: str | None = None) -> list[dict]:
        history: list[dict] = []

        def report(metrics, checkpoint_dir=None, final=False):
            history.append(dict(metrics))
            if checkpoint_dir and metrics.get("step") == 2 and restore is None:
                shutil.copytree(checkpoint_dir, tmp_path / "step2")

        train_local(cfg, train, validation, report=report, restore_dir=restore, one_process=True)
        return history

    whole = run()
    resumed = run(str(tmp_path / "step2"))
    losses = lambda h: [(x["step"], x["loss"]) for x in h if "loss" in x]
    assert [s for s, _ in losses(resumed)] == [3, 4]
    assert [x for _, x in losses(resumed)] == pytest.approx([x for _, x in losses(whole)[2:]], rel=1e-6, abs=1e-7)
    assert resumed[-1]["val_loss"] == pytest.approx(whole[-1]["val_loss"], rel=1e-6)


@pytest.mark.unit
@pytest.mark.parametrize("name", ["tiny:llama", "embedded:minilm"])
def test_plan_counts_lora_trainable_parameters_as_peft_trains_them(name):
    """The plan's adapters + head (from the meta-device shape) are what PEFT really trains, and only they carry
    gradients and optimizer state: ZeRO-2 bf16 on 8 GPUs = every weight's 2 bytes + 18 bytes per trainable / 8."""
    from pipeline import lora, memory_plan, modeling

    cfg = load_config(None, [f"model.name_or_path={name}", "lora.r=8", "train.zero_stage=2", "train.num_workers=8",
                             "train.precision=bf16"])
    tok = modeling.load_tokenizer(name)
    trained = lora.apply_lora(modeling.build_reward_model(name, tok), cfg.lora)
    counts = lora.parameter_counts(trained)
    shape = memory_plan.model_shape(name, lora=cfg.lora)
    plan = memory_plan.compute(cfg, shape, None)
    assert plan.trainable_parameters == counts["params/trainable"] and plan.parameters == counts["params/total"]
    expected = 2 * plan.parameters + 18 * plan.trainable_parameters / 8
    assert plan.model_states_gb * memory_plan.GIB == pytest.approx(expected)
    full = memory_plan.compute(load_config(None, [f"model.name_or_path={name}", "train.zero_stage=2",
                                                  "train.num_workers=8", "train.precision=bf16"]), shape, None)
    assert full.trainable_parameters == full.parameters == shape.parameters
    assert plan.model_states_gb < full.model_states_gb
