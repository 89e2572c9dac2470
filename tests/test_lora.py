"""LoRA reward models: only the adapters and the score head train, NormBT reads the head's input as without LoRA,
and both exports (merged, adapter + head) score like the training model. The failure reward-model trainers share
(the adapter saved, the freshly initialised head not, or re-initialised on load: the "trained" model scores at
chance) is reproduced by breaking the save on purpose."""

from __future__ import annotations

import pytest
import torch

from pipeline import lora, losses
from pipeline import modeling as M
from pipeline.config import ConfigError, from_flat, load_config
from pipeline.train_loop import param_groups

# Model tests train tiny models for a few steps (1-7 s each, no Ray): integration; config checks: unit.
pytestmark = pytest.mark.integration
CONV = [
    ([{"role": "user", "content": "What is 6 times 7?"}, {"role": "assistant", "content": "6 times 7 is 42."}],
     [{"role": "user", "content": "What is 6 times 7?"}, {"role": "assistant", "content": "It is 43, I think."}]),
    ([{"role": "user", "content": "Say hi"}, {"role": "assistant", "content": "Hi!"}],
     [{"role": "user", "content": "Say hi"}, {"role": "assistant", "content": "No."}]),
    ([{"role": "user", "content": "Capital of France?"}, {"role": "assistant", "content": "Paris."}],
     [{"role": "user", "content": "Capital of France?"}, {"role": "assistant", "content": "Berlin, surely."}]),
]


@pytest.fixture(scope="module")
def backbones(tmp_path_factory):
    """Model names: tiny llama/qwen2/gemma decoders saved as users bring them, and the embedded MiniLM."""
    from pipeline.decoders import make_decoder

    names = {f: make_decoder(tmp_path_factory.mktemp(f), f) for f in ("llama", "qwen2", "gemma")}
    return {**names, "minilm": "embedded:minilm"}


def _batch(tok):
    chosen = [M.encode_messages(tok, c) for c, _ in CONV]
    rejected = [M.encode_messages(tok, r) for _, r in CONV]
    return M.collate_pairs(chosen, rejected, tok.pad_token_id)


def _lora_model(name: str, **overrides):
    cfg = from_flat({"model.name_or_path": name, "lora.r": 4, "lora.alpha": 8.0, **overrides})
    tok = M.load_tokenizer(name)
    return lora.apply_lora(M.build_reward_model(name, tok, seed=1), cfg.lora), tok, cfg


def _train(model, tok, steps: int = 3) -> None:
    """A few NormBT steps with the project's optimizer groups (AdamW), as the loop takes them."""
    optimizer = torch.optim.AdamW(param_groups(model, 0.01), lr=1e-2)
    batch = _batch(tok)
    for _ in range(steps):
        rc, rr, hc, hr = M.forward_pairs(model, batch)
        loss, _ = losses.normbt_loss(rc, rr, hc, hr, mu=float(losses.pair_distances(hc, hr).mean()), eps=1e-3)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()


def _rewards(model, tok) -> torch.Tensor:
    batch = _batch(tok)
    with torch.no_grad():
        return M.forward_rewards(model, batch["input_ids"], batch["attention_mask"])[0]


FAMILIES = ["llama", "qwen2", "gemma", "minilm"]


@pytest.mark.parametrize("family", FAMILIES)
def test_only_lora_and_head_parameters_change(family, backbones):
    model, tok, _ = _lora_model(backbones[family])
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    _train(model, tok)
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert changed and changed <= trainable
    assert all(".lora_" in n or ".modules_to_save.default." in n for n in trainable), trainable - changed
    assert any(".modules_to_save.default." in n for n in changed), "the score head must train"
    assert any(".lora_B." in n for n in changed), "the adapters must train"
    frozen_head = [n for n in before if ".original_module." in n]
    assert frozen_head and not set(frozen_head) & changed


@pytest.mark.parametrize("family", ["llama", "minilm"])
def test_normbt_reads_the_head_input_as_without_lora(family, backbones):
    """Before training (B = 0) the LoRA model is the base model: same rewards and the same head input, and the
    head the hook sits on is the trained copy, recomputed in fp32."""
    name = backbones[family]
    tok = M.load_tokenizer(name)
    base = M.build_reward_model(name, tok, seed=1)
    batch = _batch(tok)
    with torch.no_grad():
        r0, h0 = M.forward_rewards(base, batch["input_ids"], batch["attention_mask"])
    model = lora.apply_lora(base, from_flat({"lora.r": 4}).lora)
    assert M.score_head(model) is lora.trained_head(model)
    with torch.no_grad():
        r1, h1 = M.forward_rewards(model, batch["input_ids"], batch["attention_mask"])
    torch.testing.assert_close(r1, r0, rtol=0, atol=0)
    torch.testing.assert_close(h1, h0, rtol=0, atol=0)
    with torch.no_grad():
        lora.trained_head(model).weight.mul_(2)  # the hook must score with the trained copy, not the original
        r2, _ = M.forward_rewards(model, batch["input_ids"], batch["attention_mask"])
    torch.testing.assert_close(r2, 2 * r0, rtol=1e-5, atol=1e-6)  # a new head's bias starts at 0


@pytest.mark.parametrize("family", FAMILIES)
def test_merged_and_adapter_exports_score_like_training(family, backbones, tmp_path):
    from transformers import AutoModelForSequenceClassification

    name = backbones[family]
    model, tok, cfg = _lora_model(name)
    _train(model, tok)
    trained = _rewards(model, tok)
    merged_dir = lora.save_export(model, tok, tmp_path / "merged", cfg.lora, state=None,
                                  extra_config={"reward_mean": 0.5, "reward_std": 2.0})
    assert not lora.is_adapter_export(merged_dir)
    plain = AutoModelForSequenceClassification.from_pretrained(str(merged_dir)).eval()  # no PEFT involved
    assert plain.config.reward_mean == 0.5 and not any("lora" in n for n, _ in plain.named_parameters())
    merged = _rewards(plain, tok)
    torch.testing.assert_close(merged, trained, rtol=1e-5, atol=1e-5)
    assert trained.std() > 1e-3, "the trained rewards must separate the responses for the comparison to mean much"

    adapter_cfg = from_flat({"lora.export": "adapter"}, base=cfg).lora
    adapter_dir = lora.save_export(model, tok, tmp_path / "adapter", adapter_cfg, state=None,
                                   extra_config={"reward_mean": 0.5, "reward_std": 2.0})
    assert lora.is_adapter_export(adapter_dir) and not (adapter_dir / "model.safetensors").exists()
    from peft import AutoPeftModelForSequenceClassification

    peft_model = AutoPeftModelForSequenceClassification.from_pretrained(str(adapter_dir), num_labels=1).eval()
    peft_model.config.pad_token_id = tok.pad_token_id
    torch.testing.assert_close(_rewards(M.disable_dropout(peft_model), tok), merged, rtol=1e-5, atol=1e-5)
    loaded, tok2 = M.load_exported(adapter_dir)  # what scoring, Best-of-N and serving call
    assert loaded.config.reward_mean == 0.5 and tok2.pad_token_id == tok.pad_token_id
    torch.testing.assert_close(_rewards(loaded, tok2), merged, rtol=1e-5, atol=1e-5)


def test_merge_equals_peft_merge_and_unload(backbones):
    """The merge of the (possibly ZeRO-3-consolidated) state dict is PEFT's own merge, weight for weight."""
    model, tok, _ = _lora_model(backbones["qwen2"])
    _train(model, tok)
    ours = lora.merged_state_dict(model, model.state_dict())
    import copy

    theirs = copy.deepcopy(model).merge_and_unload().state_dict()
    assert ours.keys() == theirs.keys()
    for key in theirs:
        torch.testing.assert_close(ours[key], theirs[key], rtol=1e-6, atol=1e-7, msg=key)


def _pair_accuracy(rewards: torch.Tensor) -> float:
    half = rewards.shape[0] // 2
    return float((rewards[:half] > rewards[half:]).float().mean())


@pytest.mark.parametrize("export", ["merged", "adapter"])
def test_a_save_that_drops_the_trained_head_is_caught(export, backbones, tmp_path, monkeypatch):
    """The shared failure: the head is not saved (or re-initialised on load), so the reloaded model scores with a
    fresh head. :func:`_reload_scores_like_training` is the check the export tests make; it must fail when the
    save drops the head, and pass on the real save."""
    model, tok, cfg = _lora_model(backbones["llama"], **{"lora.export": export})
    _train(model, tok, steps=5)
    assert _pair_accuracy(_rewards(model, tok)) == 1.0
    assert _reload_scores_like_training(model, tok, cfg, tmp_path / "good")

    if export == "merged":
        real = lora.merged_state_dict

        def headless(m, state):  # the merged weights with the score head left out: loading re-initialises it
            return {k: v for k, v in real(m, state).items() if not k.startswith("score.")}
        monkeypatch.setattr(lora, "merged_state_dict", headless)
    else:
        real_save = lora.save_export
        fresh = {k.split("original_module.")[1]: v.clone() for k, v in model.state_dict().items()
                 if "original_module." in k}  # the head as initialised, before training

        def adapter_only(*args, **kw):  # the head saved beside the adapter is the untrained one (re-initialised)
            from safetensors.torch import load_file, save_file

            folder = real_save(*args, **kw)
            weights = load_file(str(folder / "adapter_model.safetensors"))
            weights.update({k: fresh[k.rsplit(".", 1)[1]] for k in weights if ".score." in k})
            save_file(weights, str(folder / "adapter_model.safetensors"))
            return folder
        monkeypatch.setattr(lora, "save_export", adapter_only)
    assert not _reload_scores_like_training(model, tok, cfg, tmp_path / "broken")


def _reload_scores_like_training(model, tok, cfg, folder) -> bool:
    trained = _rewards(model, tok)
    lora.save_export(model, tok, folder, cfg.lora, state=None, extra_config={})
    loaded, tok2 = M.load_exported(folder)
    return torch.allclose(_rewards(loaded, tok2), trained, rtol=1e-5, atol=1e-5)


@pytest.mark.unit
def test_config_section_defaults_checks_and_targets(backbones):
    cfg = load_config(None, [])
    assert cfg.lora.r == 0 and cfg.lora.export == "merged" and not cfg.lora.load_in_4bit
    model = M.build_reward_model("tiny:bert", M.load_tokenizer("tiny:bert"))
    assert lora.apply_lora(model, cfg.lora) is model, "lora.r=0 leaves the model as it is"
    assert lora.targets(from_flat({"lora.r": 8}).lora, model) == ["query", "key", "value", "dense"]
    assert lora.targets(from_flat({"lora.target_modules": ["all-linear"]}).lora, model) == "all-linear"
    for bad, says in [({"lora.dropout": 0.1}, "lora.dropout"), ({"lora.r": -1}, "lora.r"),
                      ({"lora.load_in_4bit": True}, "lora.load_in_4bit"),
                      ({"lora.r": 4, "lora.export": "adapter", "model.name_or_path": "tiny:llama"}, "lora.export"),
                      ({"lora.rank": 4}, "lora.r")]:
        with pytest.raises(ConfigError, match=says.replace(".", r"\.")):
            from_flat(bad)
    gpt2 = type("Cfg", (), {"model_type": "gpt2"})()
    with pytest.raises(ValueError, match="no default for model type 'gpt2'"):
        lora.targets(from_flat({"lora.r": 8}).lora, type("M", (), {"config": gpt2})())


@pytest.mark.unit
def test_qlora_without_cuda_is_a_clear_error_before_anything_starts(monkeypatch):
    from pipeline import preflight

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    cfg = from_flat({"lora.r": 8, "lora.load_in_4bit": True})
    found = preflight.problems(cfg, ("data", "train"))
    assert any("lora.load_in_4bit=true (QLoRA) needs a CUDA GPU" in p for p in found), found
    with pytest.raises(RuntimeError, match="needs a CUDA GPU"):
        lora.load_kwargs(cfg.lora)  # the training worker's own check, before the backbone loads


@pytest.mark.unit
def test_the_version_description_says_lora_and_how_much_trained():
    from stages.register import lora_line

    used = {"lora.r": "8", "lora.alpha": "16.0", "lora.target_modules": "()", "lora.export": "merged",
            "lora.load_in_4bit": "False"}
    line = lora_line(used, {"params/trainable": 169345, "params/total": 22882946})
    assert line == ("- LoRA: r 8, alpha 16.0, targets the architecture's default, export merged; 169,345 of "
                    "22,882,946 parameters trained (0.74%)")
    assert lora_line({"lora.r": "0"}, {"params/trainable": 10, "params/total": 10}).startswith("- full fine-tuning")


def test_the_registry_logs_an_adapter_export_merged(backbones, tmp_path):
    """An adapter export reaches the registry as a plain transformers folder that scores like the adapter."""
    from types import SimpleNamespace

    from transformers import AutoModelForSequenceClassification

    from stages.register import registrable_folder

    model, tok, cfg = _lora_model(backbones["gemma"], **{"lora.export": "adapter"})
    _train(model, tok)
    folder = lora.save_export(model, tok, tmp_path / "adapter", cfg.lora, state=None, extra_config={})
    ctx = SimpleNamespace(out_dir=tmp_path / "register", log=lambda message: None)
    merged = registrable_folder(ctx, folder)
    assert merged != folder and not lora.is_adapter_export(merged)
    plain = AutoModelForSequenceClassification.from_pretrained(str(merged)).eval()
    torch.testing.assert_close(_rewards(plain, tok), _rewards(model, tok), rtol=1e-5, atol=1e-5)
    assert registrable_folder(ctx, merged) == merged


@pytest.mark.unit
def test_lora_keys_are_searchable_like_any_other():
    cfg = from_flat({"tune.search_space": {"lora.r": {"choice": [4, 8]}, "lora.alpha": {"uniform": [8, 32]}},
                     "tune.trial_overrides": {"lora.r": 4}})
    assert set(cfg.tune.search_space) == {"lora.r", "lora.alpha"}
    assert from_flat({"lora.r": 8, "lora.alpha": 24.0}, base=cfg).lora.alpha == 24.0


@pytest.mark.parametrize("name", ["tiny:bert", "tiny:llama"])
def test_all_linear_adapts_the_backbone_and_leaves_the_head_whole(name):
    tok = M.load_tokenizer(name)
    model = lora.apply_lora(M.build_reward_model(name, tok, seed=1),
                            from_flat({"lora.r": 4, "lora.target_modules": ["all-linear"]}).lora)
    assert M.score_head(model) is lora.trained_head(model)
    assert not any(".modules_to_save.default.lora_" in n for n, _ in model.named_parameters())
    assert lora.run_metrics(from_flat({"lora.r": 4}).lora, model)["lora/adapted_modules"] >= 12
