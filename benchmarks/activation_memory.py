"""The memory plan's activation figure against what autograd really keeps, on CPU (no GPU needed).

    python benchmarks/activation_memory.py [--tokens 512] [--sequences 4]

A random Llama-shaped reward model (hidden 256, gated MLP 1024, 4 layers, 8 heads; fp32) runs one forward over
``--sequences`` unpadded sequences of ``--tokens`` tokens; every tensor autograd saves for the backward pass is
counted once by its storage (``torch.autograd.graph.saved_tensors_hooks``). That is the activation memory of the
forward; with checkpointing, the one layer recomputed during the backward pass comes on top of it and is not seen
here (the plan counts it). Printed per kernel and checkpointing: measured, planned, measured/planned.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def saved_bytes(model, ids) -> int:
    import torch

    storages: dict[int, int] = {}

    def pack(tensor):
        storage = tensor.untyped_storage()
        storages[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=False)
    return sum(storages.values())


def main() -> None:
    import torch
    from transformers import AutoModelForSequenceClassification, LlamaConfig

    from pipeline import memory_plan, modeling

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=512)
    parser.add_argument("--sequences", type=int, default=4)
    args = parser.parse_args()
    config = LlamaConfig(vocab_size=1000, hidden_size=256, intermediate_size=1024, num_hidden_layers=4,
                         num_attention_heads=8, num_key_value_heads=8, pad_token_id=0, num_labels=1)
    shape = memory_plan.ModelShape(source="random", model_type="llama", parameters=0, largest_layer_parameters=0,
                                   layers=4, hidden_size=256, heads=8, intermediate_size=1024, gated_mlp=True)
    ids = torch.randint(1, 1000, (args.sequences, args.tokens), generator=torch.Generator().manual_seed(0))
    results = []
    for kernel in ("sdpa", "eager"):
        for checkpointing in (False, True):
            torch.manual_seed(0)
            model = modeling.disable_dropout(AutoModelForSequenceClassification.from_config(
                config, attn_implementation=kernel))
            if checkpointing:
                modeling.enable_checkpointing(model)
            measured = saved_bytes(model, ids)
            planned = memory_plan.activation_bytes(shape, tokens=args.tokens, sequences=args.sequences, bf16=False,
                                                   eager=kernel == "eager", checkpointing=checkpointing)
            results.append({"kernel": kernel, "checkpointing": checkpointing, "measured_mib": measured / 2**20,
                            "planned_mib": planned / 2**20, "measured_over_planned": measured / planned})
            print(json.dumps(results[-1]), flush=True)


if __name__ == "__main__":
    main()
