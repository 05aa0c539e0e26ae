"""Peak K/V bytes and peak memory of a long-prompt prefill: stock `generate` vs SpecKV vs SnapKV.

Each method runs in its own subprocess (so its peak memory is its own) on the same random-weight model and prompt,
with `max_new_tokens=1` so the numbers are the prefill's. "Peak K/V" is measured from the real tensors: the bytes
the cache holds plus the K/V of the layer being computed, sampled at every `Cache.update`. "Peak memory growth" is
the process's peak RSS during `generate` minus before it on CPU, and `torch.cuda.max_memory_allocated` above what
was allocated before `generate` on CUDA.

    python benchmarks/prefill_memory.py --prompt-tokens 8192
    python benchmarks/prefill_memory.py --device cuda --dtype bfloat16 --prompt-tokens 32768

Prints a table with ratios against stock `generate` measured in the same run.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

import torch
import transformers
from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM

import hf_specapprox as hs


def build(args, seed, num_layers):
    """A random-weight Llama on `args.device` in `args.dtype` (initialised there: fast on GPUs)."""
    config = LlamaConfig(
        vocab_size=1024, hidden_size=args.heads * args.head_dim, intermediate_size=2 * args.heads * args.head_dim,
        num_hidden_layers=num_layers, num_attention_heads=args.heads, num_key_value_heads=args.kv_heads,
        max_position_embeddings=args.prompt_tokens + 1024, eos_token_id=None,
    )
    config._attn_implementation = "sdpa"
    torch.manual_seed(seed)
    with torch.device(args.device):
        model = LlamaForCausalLM(config)
    return model.to(getattr(torch, args.dtype)).eval()


def tensor_bytes(*tensors):
    return sum(t.numel() * t.element_size() for t in tensors if isinstance(t, torch.Tensor))


def layer_bytes(layers):
    return sum(tensor_bytes(layer.keys, layer.values) for layer in layers)


class MeasuredDynamicCache(DynamicCache):
    peak = 0

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        out = super().update(key_states, value_states, layer_idx, *args, **kwargs)
        self.peak = max(self.peak, layer_bytes(self.layers))
        return out


def measured(cache_cls):
    class Measured(cache_cls):
        peak = 0

        def update(self, key_states, value_states, layer_idx, *args, **kwargs):
            held = layer_bytes(self.layers) + tensor_bytes(key_states, value_states)
            self.peak = max(self.peak, held)
            return super().update(key_states, value_states, layer_idx, *args, **kwargs)

    return Measured


def worker(args):
    torch.set_num_threads(args.threads)
    target = build(args, 0, args.layers)
    ids = torch.randint(3, 1024, (1, args.prompt_tokens), generator=torch.Generator().manual_seed(0)).to(args.device)
    if args.worker == "stock":
        cache = MeasuredDynamicCache()
    elif args.worker == "speckv":
        draft = build(args, 1, args.draft_layers)
        cache = measured(hs.SpecKVCache)(draft=draft, model=target, max_capacity_prompt=args.budget,
                                         lookahead_tokens=args.lookahead)
    elif args.worker == "snapkv":
        cache = measured(hs.SnapKVCache)(model=target, max_capacity_prompt=args.budget)
    else:
        raise ValueError(args.worker)
    cuda = args.device == "cuda"
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        baseline = torch.cuda.memory_allocated()
    else:
        baseline = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    start = time.perf_counter()
    with torch.no_grad():
        target.generate(input_ids=ids, attention_mask=torch.ones_like(ids), past_key_values=cache, max_new_tokens=1,
                        do_sample=False)
    if cuda:
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    peak = torch.cuda.max_memory_allocated() if cuda else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(json.dumps({
        "method": args.worker, "peak_kv_bytes": cache.peak, "final_kv_bytes": layer_bytes(cache.layers),
        "memory_growth_bytes": peak - baseline, "seconds": seconds,
    }))


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prompt-tokens", type=int, default=8192)
    parser.add_argument("--layers", type=int, default=16)
    parser.add_argument("--draft-layers", type=int, default=2)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--kv-heads", type=int, default=8)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--budget", type=int, default=256)
    parser.add_argument("--lookahead", type=int, default=16)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--methods", default="stock,speckv,snapkv")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(args)

    rows = []
    for method in args.methods.split(","):
        command = [sys.executable, __file__, "--worker", method] + [
            f"--{k.replace('_', '-')}={v}" for k, v in vars(args).items() if k not in ("worker", "methods")
        ]
        output = subprocess.run(command, check=True, capture_output=True, text=True).stdout
        rows.append(json.loads(output.strip().splitlines()[-1]))
    base = next(row for row in rows if row["method"] == "stock") if "stock" in args.methods else rows[0]
    where = torch.cuda.get_device_name() if args.device == "cuda" else f"cpu, {args.threads} threads"
    print(f"torch {torch.__version__}, transformers {transformers.__version__}, {where}; "
          f"prompt {args.prompt_tokens} tokens, {args.layers} layers x {args.kv_heads} KV heads x {args.head_dim} dims "
          f"{args.dtype}, budget {args.budget}, lookahead {args.lookahead}, draft {args.draft_layers} layers")
    print("| method | peak K/V MiB | vs stock | K/V after prefill MiB | peak memory growth MiB | vs stock | seconds "
          "| vs stock |")
    print("|---|---|---|---|---|---|---|---|")
    for row in rows:
        print(
            f"| {row['method']} | {row['peak_kv_bytes'] / 2**20:.1f} | {row['peak_kv_bytes'] / base['peak_kv_bytes']:.3f} "
            f"| {row['final_kv_bytes'] / 2**20:.1f} | {row['memory_growth_bytes'] / 2**20:.0f} "
            f"| {row['memory_growth_bytes'] / max(base['memory_growth_bytes'], 1):.2f} | {row['seconds']:.2f} "
            f"| {row['seconds'] / base['seconds']:.2f} |"
        )


if __name__ == "__main__":
    main()
