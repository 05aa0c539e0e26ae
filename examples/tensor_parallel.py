"""SpecKV with a target sharded by transformers' own tensor parallelism: every rank holds half of the KV heads and
keeps its own heads' best positions; the draft's preview is computed once, on the first rank, and broadcast.

    torchrun --nproc_per_node 2 examples/tensor_parallel.py                          # tiny random models (CPU, gloo)
    torchrun --nproc_per_node 2 examples/tensor_parallel.py --target PATH --draft PATH
    python examples/tensor_parallel.py                                                 # one process, same answers
"""

from __future__ import annotations

import os
import tempfile

import torch
from transformers import AutoModelForCausalLM

import hf_specapprox
from hf_specapprox import SpecKVCache, compat
from _common import parser


def _checkpoints(args, folder: str):
    """Local checkpoint paths of the target and the draft (tiny random ones written to `folder` by default)."""
    if args.target:
        if not args.draft:
            raise SystemExit("--target needs --draft too")
        return args.target, args.draft
    from hf_specapprox.testing import tiny_pair

    target, draft = tiny_pair()  # seeded: every rank writes the same weights to its own folder
    target.save_pretrained(os.path.join(folder, "target"))
    draft.save_pretrained(os.path.join(folder, "draft"))
    return os.path.join(folder, "target"), os.path.join(folder, "draft")


def main(argv=None):
    args = parser(__doc__).parse_args(argv)
    sharded = "WORLD_SIZE" in os.environ  # started by torchrun
    rank = int(os.environ.get("RANK", 0))
    with tempfile.TemporaryDirectory() as folder:
        target_path, draft_path = _checkpoints(args, folder)
        target = AutoModelForCausalLM.from_pretrained(target_path,
                                                      **(compat.tensor_parallel_kwargs() if sharded else {}))
        draft = AutoModelForCausalLM.from_pretrained(draft_path).eval()  # replicated; only the first rank runs it
    hf_specapprox.bind(target)

    ids = torch.randint(3, 90, (2, 300), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    cache = SpecKVCache(draft=draft, max_capacity_prompt=64, window_size=16, lookahead_tokens=16)
    out = target.generate(input_ids=ids, attention_mask=mask, past_key_values=cache, max_new_tokens=8,
                          do_sample=False, pad_token_id=0)
    kv_heads = cache.kept_positions(0).shape[1]
    print(f"rank {rank}: tensor-parallel size {getattr(target, 'tp_size', None) or 1}, holds {kv_heads} KV head(s) "
          f"per layer, {cache.cache_bytes() / 1024:.0f} KiB of cache; answers {out[:, ids.shape[1]:].tolist()}")
    return out, cache


if __name__ == "__main__":
    main()
