"""Best-of-N generation: a causal-LM policy samples ``n`` candidates per prompt in a Ray Data actor pool that loads
the model once per actor (one GPU per actor on GPU; ``best_of_n.engine``: vLLM when forced, or on GPU when it is
installed, else transformers). Prompts are tokenised once on the driver with the chat template plus generation
prompt (at the fixed template date), so both engines see identical ids; every prompt's pool is seeded by the prompt
itself, so it does not depend on which actor or batch drew it.
"""

from __future__ import annotations

import hashlib
import importlib.util
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import pandas as pd

from pipeline import modeling
from pipeline.config import ConfigError, PipelineConfig


@dataclass(frozen=True, kw_only=True)
class Sampling:
    """What a generation actor needs (plain values: it is pickled to every actor)."""

    model: str
    n: int
    temperature: float
    top_p: float
    max_new_tokens: int
    seed: int
    use_gpu: bool


def generate_with_ray(prompts: list[dict[str, Any]], cfg: PipelineConfig) -> pd.DataFrame:
    """Sample ``n_max`` completions per prompt with the ``hf`` policy in a Ray Data actor pool."""
    import ray

    bon = cfg.best_of_n
    sampling = Sampling(model=bon.policy_model, n=bon.n_max, temperature=bon.temperature, top_p=bon.top_p,
                        max_new_tokens=bon.max_new_tokens, seed=bon.seed, use_gpu=cfg.train.use_gpu)
    # Prompts are tokenised once here, so both engines see identical token ids (no double BOS).
    tokenizer = modeling.load_tokenizer(bon.policy_model)
    items = [{"prompt_id": p["prompt_id"], "prompt_ids": render_prompt_ids(tokenizer, p["messages"])}
             for p in prompts]
    actors = actor_count(cfg.train.use_gpu, len(items))
    resources = {"num_gpus": 1} if cfg.train.use_gpu else {"num_cpus": 1}
    generated = ray.data.from_items(items).map_batches(
        _generator_class(sampling, bon.engine), fn_constructor_kwargs={"sampling": sampling}, batch_format="pandas",
        batch_size=max(1, min(8, -(-len(items) // actors))), compute=ray.data.ActorPoolStrategy(size=actors),
        **resources)
    return generated.to_pandas()


def render_prompt_ids(tokenizer: Any, messages: Sequence[Mapping[str, str]]) -> list[int]:
    """Prompt token ids: chat template + generation prompt (at the fixed template date), else
    ``"User: ...\\n\\nAssistant:"``."""
    return modeling.encode_messages(tokenizer, messages, add_generation_prompt=True)


def actor_count(use_gpu: bool, work_items: int, cpus_per_actor: float = 1.0) -> int:
    """One actor per GPU; on CPU as many as half the cores hold, so Ray Data's own tasks are never starved
    (2-core trap); at least one."""
    import ray

    resources = ray.cluster_resources()
    available = int(resources.get("GPU", 0)) if use_gpu else int(resources.get("CPU", 1) / 2 // cpus_per_actor)
    return max(1, min(work_items, available))


def _generator_class(sampling: Sampling, engine: str) -> type:
    """``best_of_n.engine``: vLLM or transformers when forced; auto picks vLLM on GPU when it is installed."""
    vllm_ok = importlib.util.find_spec("vllm") is not None
    if engine == "vllm" and not vllm_ok:
        raise ConfigError("best_of_n.engine=vllm but vllm is not installed")
    automatic = sampling.use_gpu and vllm_ok and not modeling.tiny_arch(sampling.model)
    return VllmGenerator if engine == "vllm" or (engine == "auto" and automatic) else HFGenerator


def prompt_seed(seed: int, prompt_id: str) -> int:
    """Per-prompt sampling seed: a prompt's candidates do not depend on which actor or batch drew them."""
    return int.from_bytes(hashlib.sha256(f"{seed}|{prompt_id}".encode()).digest()[:4], "big")


class HFGenerator:
    """``map_batches`` callable: loads the policy once per actor; ``generate`` samples each prompt's pool."""

    def __init__(self, sampling: Sampling) -> None:
        import torch

        self.sampling = sampling
        self.device = "cuda" if sampling.use_gpu else "cpu"
        self.tokenizer = modeling.load_tokenizer(sampling.model)
        dtype = torch.bfloat16 if sampling.use_gpu else None
        model = modeling.build_causal_lm(sampling.model, self.tokenizer, seed=sampling.seed, dtype=dtype)
        self.model = model.to(self.device).eval()

    def __call__(self, batch: pd.DataFrame) -> pd.DataFrame:
        rows = [row for pid, ids in zip(batch["prompt_id"], batch["prompt_ids"], strict=True)
                for row in self._pool(str(pid), [int(i) for i in ids])]
        return pd.DataFrame(rows, columns=["prompt_id", "candidate_id", "text"])

    def _pool(self, prompt_id: str, prompt_ids: list[int]) -> list[dict[str, Any]]:
        import torch

        s = self.sampling
        torch.manual_seed(prompt_seed(s.seed, prompt_id))
        input_ids = torch.tensor([prompt_ids], device=self.device)
        # One prompt per call (no padding): sampling stays reproducible whatever the batching.
        with torch.no_grad():
            out = self.model.generate(input_ids=input_ids, attention_mask=torch.ones_like(input_ids),
                                      do_sample=True, temperature=s.temperature, top_p=s.top_p,
                                      max_new_tokens=s.max_new_tokens, num_return_sequences=s.n,
                                      pad_token_id=self.tokenizer.pad_token_id)
        texts = self.tokenizer.batch_decode(out[:, input_ids.shape[1]:], skip_special_tokens=True)
        return [{"prompt_id": prompt_id, "candidate_id": j, "text": t.strip()} for j, t in enumerate(texts)]


class VllmGenerator:
    """``map_batches`` callable with vLLM as the engine (optional; same contract as :class:`HFGenerator`)."""

    def __init__(self, sampling: Sampling) -> None:
        from vllm import LLM

        self.sampling = sampling
        self.llm = LLM(model=modeling.resolve_model_path(sampling.model), seed=sampling.seed)

    def __call__(self, batch: pd.DataFrame) -> pd.DataFrame:
        from vllm import SamplingParams

        s = self.sampling
        ids = [str(pid) for pid in batch["prompt_id"]]
        params = [SamplingParams(n=s.n, temperature=s.temperature, top_p=s.top_p, max_tokens=s.max_new_tokens,
                                 seed=prompt_seed(s.seed, pid)) for pid in ids]
        inputs = [{"prompt_token_ids": [int(i) for i in toks]} for toks in batch["prompt_ids"]]
        results = self.llm.generate(inputs, params, use_tqdm=False)
        rows = [{"prompt_id": pid, "candidate_id": j, "text": c.text.strip()}
                for pid, result in zip(ids, results, strict=True) for j, c in enumerate(result.outputs)]
        return pd.DataFrame(rows, columns=["prompt_id", "candidate_id", "text"])
