"""SpecKV with stock `generate`: a batch of two left-padded long prompts, compressed to a 64-token KV budget.

Runs on tiny random-weight models by default (seconds, offline). With `--target`/`--draft` it loads any local
checkpoint pair that shares a tokenizer, e.g. Qwen2.5-Coder-1.5B-Instruct with Qwen2.5-Coder-0.5B-Instruct.

    python examples/speckv_generate.py
    python examples/speckv_generate.py --target path/to/target --draft path/to/draft --budget 256
"""

from __future__ import annotations

import argparse

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

import hf_specapprox
from hf_specapprox import SpecKVCache


def tiny_pair():
    config = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, eos_token_id=2, pad_token_id=0)
    torch.manual_seed(0)
    return LlamaForCausalLM(config).eval(), LlamaForCausalLM(config).eval()


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--target")
    parser.add_argument("--draft")
    parser.add_argument("--budget", type=int, default=64)
    parser.add_argument("--lookahead", type=int, default=16)
    args = parser.parse_args(argv)

    if args.target:
        tokenizer = AutoTokenizer.from_pretrained(args.target, padding_side="left")
        target = AutoModelForCausalLM.from_pretrained(args.target, dtype=torch.float32).eval()
        draft = AutoModelForCausalLM.from_pretrained(args.draft, dtype=torch.float32).eval()
        text = "The quick brown fox jumps over the lazy dog. " * 60
        prompts = [text + "What animal jumps?", "Repeat: " + text[:1000] + "Which dog?"]
        inputs = tokenizer(prompts, return_tensors="pt", padding=True)
    else:
        target, draft = tiny_pair()
        ids = torch.randint(3, 128, (2, 300), generator=torch.Generator().manual_seed(0))
        mask = torch.ones_like(ids)
        ids[1, :40], mask[1, :40] = 0, 0  # the second prompt is shorter: left padding
        inputs = {"input_ids": ids, "attention_mask": mask}

    hf_specapprox.bind(target)
    cache = SpecKVCache(draft=draft, max_capacity_prompt=args.budget, lookahead_tokens=args.lookahead)
    out = target.generate(**inputs, past_key_values=cache, max_new_tokens=16, do_sample=False,
                          pad_token_id=target.generation_config.pad_token_id or 0)

    prompt_length = inputs["input_ids"].shape[1]
    uncompressed_rows = out.shape[1] - 1  # what a DynamicCache would hold
    print(f"prompt: {prompt_length} tokens; kept per layer and KV head: {args.budget}")
    print(f"cache: {cache.get_seq_length()} tokens seen, {cache.layers[0].keys.shape[-2]} rows stored per layer "
          f"({cache.cache_bytes() / 1024:.0f} KiB; {uncompressed_rows} rows without compression)")
    print("generated ids:", out[:, prompt_length:].tolist())
    return out, cache


if __name__ == "__main__":
    main()
