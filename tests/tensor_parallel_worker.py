"""One process of the tensor-parallel test (tests/test_tensor_parallel.py), run under `torchrun` (2 ranks, gloo) or
alone (the single-process reference). Writes `rank<R>.json` into the output folder: per method, the generated tokens,
the kept positions of every compressed layer and the KV heads this rank holds.

Usage: python tensor_parallel_worker.py TARGET_DIR DRAFT_DIR OUT_DIR [--perturb-other-drafts]
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM

import hf_specapprox as hs
from hf_specapprox import compat
from hf_specapprox.integrations import registry

METHODS = {
    "speckv": {"speckv_config": hs.SpecKVConfig(max_capacity_prompt=12, window_size=3, lookahead_tokens=4)},
    "snapkv": {"snapkv_config": hs.SnapKVConfig(max_capacity_prompt=12, window_size=3)},
    "speckv_pc": {"specpc_config": hs.SpecPCConfig(max_capacity_prompt=40, window_size=4, kernel_size=3,
                                                   starting_layer_index=0, lookahead_tokens=4),
                  "speckv_config": hs.SpecKVConfig(max_capacity_prompt=12, window_size=3)},
}


def main(target_dir: str, draft_dir: str, out_dir: str, perturb_other_drafts: bool) -> None:
    sharded = "WORLD_SIZE" in os.environ
    target = AutoModelForCausalLM.from_pretrained(target_dir, **(compat.tensor_parallel_kwargs() if sharded else {}))
    draft = AutoModelForCausalLM.from_pretrained(draft_dir).eval()
    rank = torch.distributed.get_rank() if sharded else 0
    if perturb_other_drafts and rank > 0:  # a draft that would preview other tokens: the broadcast must override it
        with torch.no_grad():
            for parameter in draft.parameters():
                parameter.add_(torch.randn_like(parameter))
    hs.bind(target)
    generator = torch.Generator().manual_seed(5)
    ids = torch.randint(3, 90, (2, 60), generator=generator)
    mask = torch.ones_like(ids)
    mask[1, :7] = 0
    ids[1, :7] = 0
    results = {}
    for name, configs in METHODS.items():
        spec = registry.get_method(name)
        prepared = spec.build(draft if spec.uses_draft else None, **configs)(target, ids, mask)
        out = target.generate(**prepared.model_inputs, **prepared.cache_kwargs(target), max_new_tokens=5,
                              min_new_tokens=5, do_sample=False, pad_token_id=0)
        cache = prepared.cache
        kept = [cache.kept_positions(index) for index in range(len(cache.layers))]
        results[name] = {
            "tokens": out[:, prepared.input_ids.shape[1]:].tolist(),
            "compressed_ids": prepared.input_ids.tolist(),
            "lookahead": None if cache.lookahead_ids is None else cache.lookahead_ids.tolist(),
            "kept": [None if positions is None else positions.tolist() for positions in kept],
            "kv_heads": [None if positions is None else positions.shape[1] for positions in kept],
        }
    results["tp_size"] = getattr(target, "tp_size", None)
    # Ranks given different prompts: every rank refuses (before: the other ranks silently got rank 0's preview).
    other = ids.clone()
    if rank > 0:
        other[0, 30] = (other[0, 30] + 1) % 90 + 3
    refusals = {}
    for name, configs in METHODS.items():
        spec = registry.get_method(name)
        try:
            prepared = spec.build(draft if spec.uses_draft else None, **configs)(target, other, mask)
            target.generate(**prepared.model_inputs, **prepared.cache_kwargs(target), max_new_tokens=2,
                            do_sample=False, pad_token_id=0)
            refusals[name] = None
        except ValueError as error:
            refusals[name] = f"{type(error).__name__}: {error}"
    results["different_prompts"] = refusals
    Path(out_dir, f"rank{rank}.json").write_text(json.dumps(results))


if __name__ == "__main__":
    main(*sys.argv[1:4], perturb_other_drafts="--perturb-other-drafts" in sys.argv)
