"""Tokenizers in the four styles reward models ship with, built offline, and a reward model for each.

The chat templates are the real models' own, copied as data from their public ``tokenizer_config.json``:

* ``llama3``: meta-llama/Meta-Llama-3-8B-Instruct. The template writes ``bos_token`` and the tokenizer's
  post-processor adds ``<|begin_of_text|>`` as well (a text tokenised with special tokens gets two).
* ``gemma``: google/gemma-2b-it. ``{{ bos_token }}`` in the template, ``<bos>`` by the post-processor; every
  turn ends ``<end_of_turn>\\n``.
* ``chatml``: Qwen/Qwen2-7B-Instruct. No BOS; a default system turn; every turn ends ``<|im_end|>\\n``.
* ``bert``: the embedded all-MiniLM-L6-v2 tokenizer itself (``[CLS]``/``[SEP]`` by the post-processor, no
  template: the project's plain role-tagged text).

The decoder styles reuse :mod:`pipeline.decoders`' byte-level BPE (trained on the synthetic benchmark's text, so
no test text maps to an unknown token) with the real template and the real post-processor added.
"""

from __future__ import annotations

from pathlib import Path

STYLES = ("llama3", "gemma", "chatml", "bert")

LLAMA3_TEMPLATE = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = '<|start_header_id|>' + "
    "message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + '<|eot_id|>' %}{% if loop.index0 == 0 %}"
    "{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}")
GEMMA_TEMPLATE = (
    "{{ bos_token }}{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}"
    "{% endif %}{% for message in messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if (message['role'] == 'assistant') %}{% set role = 'model' %}{% else %}{% set role = message['role'] %}"
    "{% endif %}{{ '<start_of_turn>' + role + '\n' + message['content'] | trim + '<end_of_turn>\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{'<start_of_turn>model\n'}}{% endif %}")
CHATML_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' }}{% endif %}{{'<|im_start|>' + "
    "message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|im_start|>assistant\n' }}{% endif %}")

# style -> (pipeline.decoders family, template, the policy's stop token that ends a generated response)
_DECODERS = {"llama3": ("llama", LLAMA3_TEMPLATE, "<|eot_id|>"), "gemma": ("gemma", GEMMA_TEMPLATE, "<end_of_turn>"),
             "chatml": ("qwen2", CHATML_TEMPLATE, "<|im_end|>")}


def tokenizer(style: str):
    """The ``style`` tokenizer (a ``PreTrainedTokenizerFast``)."""
    from tokenizers.processors import TemplateProcessing

    from pipeline import decoders, modeling

    if style == "bert":
        return modeling.load_tokenizer("embedded:minilm")
    family, template, _ = _DECODERS[style]
    tok = decoders.tokenizer(family)
    tok.chat_template = template
    if tok.bos_token is not None:  # Llama 3 and Gemma tokenizers add their BOS themselves, template or not
        tok.backend_tokenizer.post_processor = TemplateProcessing(
            single=f"{tok.bos_token} $A", pair=f"{tok.bos_token} $A $B", special_tokens=[(tok.bos_token, tok.bos_token_id)])
    return tok


def stop_token(style: str) -> str | None:
    """What an RL policy of this style generates last (None for an encoder: it generates nothing)."""
    return _DECODERS[style][2] if style in _DECODERS else None


def reward_model_folder(style: str, folder: str | Path, seed: int = 0) -> str:
    """A random reward model of ``style`` saved as the train stage exports one (plain ``save_pretrained``)."""
    import torch
    from transformers import (
        AutoModelForSequenceClassification,
        GemmaConfig,
        LlamaConfig,
        Qwen2Config,
    )

    from pipeline import modeling

    tok = tokenizer(style)
    shape = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4}
    if style == "bert":  # the real MiniLM backbone: a random BERT this small barely reads its input
        model = modeling.build_reward_model("embedded:minilm", tok, seed=seed)
        return str(modeling.save_reward_model(modeling.disable_dropout(model), tok, Path(folder)))
    cls = {"llama3": LlamaConfig, "gemma": GemmaConfig, "chatml": Qwen2Config}[style]
    config = cls(vocab_size=len(tok), pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id,
                 bos_token_id=tok.bos_token_id, num_labels=1, num_key_value_heads=2, head_dim=8,
                 max_position_embeddings=512, **shape)
    torch.manual_seed(seed)
    model = modeling.disable_dropout(AutoModelForSequenceClassification.from_config(config))
    return str(modeling.save_reward_model(model, tok, Path(folder)))
