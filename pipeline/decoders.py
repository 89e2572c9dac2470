"""Random decoders as users bring them, offline: a local ``save_pretrained`` folder with a causal-LM checkpoint (no
score head), a byte-level BPE tokenizer whose pad token is its EOS token, and a chat template in the family's style
(Llama 3's writes a date unless ``date_string`` is given). ``tiny`` (about 60k parameters, built in about a second)
serves the tests; ``100m`` (about 107M parameters as a reward model) the GPU check (``benchmarks/gpu_check.py``)."""

from __future__ import annotations

from pathlib import Path

FAMILIES = ("llama", "qwen2", "gemma")
_SIZES = {
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, max_position_embeddings=512, head_dim=16),
    "100m": dict(hidden_size=768, intermediate_size=2048, num_hidden_layers=16, num_attention_heads=12,
                 num_key_value_heads=4, max_position_embeddings=2048, head_dim=64),
}
_SPECIAL = {
    "llama": {"bos": "<|begin_of_text|>", "eos": "<|eot_id|>", "extra": ["<|start_header_id|>", "<|end_header_id|>"]},
    "qwen2": {"bos": None, "eos": "<|im_end|>", "extra": ["<|im_start|>"]},
    "gemma": {"bos": "<bos>", "eos": "<eos>", "extra": ["<start_of_turn>", "<end_of_turn>"]},
}
_TEMPLATES = {
    # Llama 3.x: the system turn carries today's date unless the caller pins date_string
    "llama": ("{{- bos_token }}{%- if not date_string is defined %}{%- if strftime_now is defined %}"
              "{%- set date_string = strftime_now('%d %b %Y') %}{%- else %}{%- set date_string = '26 Jul 2024' %}"
              "{%- endif %}{%- endif %}"
              "<|start_header_id|>system<|end_header_id|>\n\nToday Date: {{ date_string }}<|eot_id|>"
              "{%- for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n"
              "{{ m['content'] | trim }}<|eot_id|>{%- endfor %}"
              "{%- if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{%- endif %}"),
    "qwen2": ("{%- for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{%- endfor %}"
              "{%- if add_generation_prompt %}<|im_start|>assistant\n{%- endif %}"),
    "gemma": ("{{ bos_token }}{%- for m in messages %}"
              "{%- set role = 'model' if m['role'] == 'assistant' else m['role'] %}"
              "<start_of_turn>{{ role }}\n{{ m['content'] | trim }}<end_of_turn>\n{%- endfor %}"
              "{%- if add_generation_prompt %}<start_of_turn>model\n{%- endif %}"),
}


def _corpus() -> list[str]:
    from pipeline import synthetic

    rows = synthetic.generate(synthetic.SyntheticSpec(n_train=200), "train")
    return [m["content"] for r in rows for m in r["prompt"] + r["chosen"] + r["rejected"]]


def tokenizer(family: str, vocab_size: int = 600):
    """A byte-level BPE ``PreTrainedTokenizerFast`` with pad = EOS and the family's template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    special = _SPECIAL[family]
    tokens = [t for t in (special["bos"], special["eos"], *special["extra"]) if t]
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator(_corpus(), trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=tokens,
                                                           initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                                           show_progress=False))
    return PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token=special["bos"], eos_token=special["eos"],
                                   pad_token=special["eos"], chat_template=_TEMPLATES[family])


def make_decoder(folder: str | Path, family: str, seed: int = 0, size: str = "tiny") -> str:
    """Write a random ``family`` causal LM of ``size`` and its tokenizer to ``folder``; returns the folder."""
    import torch
    from transformers import AutoModelForCausalLM, GemmaConfig, LlamaConfig, Qwen2Config

    tok = tokenizer(family, vocab_size=600 if size == "tiny" else 8000)
    ids = dict(vocab_size=len(tok), pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id,
               bos_token_id=tok.bos_token_id)
    config = {"llama": LlamaConfig, "qwen2": Qwen2Config, "gemma": GemmaConfig}[family](**_SIZES[size], **ids)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)
    folder = Path(folder)
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return str(folder)
