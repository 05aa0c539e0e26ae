"""Time per output token on CPU: SnapKV-compressed decoding on the dynamic layers vs the static layers, eager and
compiled (`cache.use_static_decode`), with the full-cache stock run as the reference.

A random-weight Llama whose KV cache matters (4 layers, hidden 256, 16 query / 16 KV heads x 64, MLP 512), fp32.
Each method runs `--runs` timed generations after one warm-up (which includes compilation, reported apart); the time
per output token is the median step interval inside a run (steps 2..N, timed by a logits processor that records when
each step's logits arrive), then the median over runs. Runs are interleaved across methods.

    python benchmarks/static_decode.py --prompt 4096 --budget 256 --new 64 --runs 3 [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time

import torch
import transformers
from transformers import CompileConfig, LlamaConfig, LlamaForCausalLM, LogitsProcessor, LogitsProcessorList

import hf_specapprox as hs


class StepClock(LogitsProcessor):
    def __init__(self):
        self.times = []

    def __call__(self, input_ids, scores):
        self.times.append(time.perf_counter())
        return scores


def model(seed: int = 0):
    config = LlamaConfig(vocab_size=1024, hidden_size=256, intermediate_size=512, num_hidden_layers=4,
                         num_attention_heads=16, num_key_value_heads=16, head_dim=64, max_position_embeddings=65536,
                         pad_token_id=0, eos_token_id=None, bos_token_id=1)
    config._attn_implementation = "sdpa"
    torch.manual_seed(seed)
    return LlamaForCausalLM(config).eval()


def run_once(target, method: str, ids, budget: int, new: int):
    clock = StepClock()
    kwargs = dict(max_new_tokens=new, min_new_tokens=new, do_sample=False, pad_token_id=0,
                  logits_processor=LogitsProcessorList([clock]))
    mask = torch.ones_like(ids)
    start = time.perf_counter()
    if method == "stock":
        target.generate(input_ids=ids, attention_mask=mask, **kwargs)
    else:
        cache = hs.SnapKVCache(max_capacity_prompt=budget)
        if method.startswith("static"):
            cache.use_static_decode(new)
        cache.prepare_prefill(target, ids, {"attention_mask": mask})
        if method == "static-compiled":
            config = CompileConfig(fullgraph=True, mode=None)
            config._compile_all_devices = True
            kwargs["compile_config"] = config
        target.generate(input_ids=ids, attention_mask=mask, past_key_values=cache, **kwargs)
    total = time.perf_counter() - start
    steps = [b - a for a, b in zip(clock.times[1:], clock.times[2:])]  # decode steps after the first compiled one
    return total, statistics.median(steps)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--prompt", type=int, default=4096)
    parser.add_argument("--budget", type=int, default=256)
    parser.add_argument("--new", type=int, default=64)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--methods", default="stock,dynamic,static-eager,static-compiled")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    target = model()
    ids = torch.randint(3, 1024, (1, args.prompt), generator=torch.Generator().manual_seed(1))
    methods = args.methods.split(",")
    warm = {method: run_once(target, method, ids, args.budget, args.new)[0] for method in methods}
    timed = {method: [] for method in methods}
    for _ in range(args.runs):  # interleaved, so drifting machine load hits every method alike
        for method in methods:
            timed[method].append(run_once(target, method, ids, args.budget, args.new))
    rows = []
    for method in methods:
        total = statistics.median(t for t, _ in timed[method])
        tpot = statistics.median(s for _, s in timed[method])
        rows.append(dict(method=method, prompt_tokens=args.prompt, new_tokens=args.new, budget=args.budget,
                         tpot_ms=round(tpot * 1e3, 3), total_s=round(total, 3),
                         warmup_minus_steady_s=round(warm[method] - total, 3)))
        print(json.dumps(rows[-1]), flush=True)
    info = dict(torch=torch.__version__, transformers=transformers.__version__, threads=torch.get_num_threads(),
                machine=platform.processor() or platform.machine())
    print(json.dumps(info))
    if args.json:
        with open(args.json, "w") as handle:
            json.dump({"rows": rows, "info": info}, handle, indent=1)


if __name__ == "__main__":
    main()
