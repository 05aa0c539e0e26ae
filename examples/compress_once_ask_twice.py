"""Compress a long document once, then ask a follow-up question on the same (compressed) cache.

The second `generate` call passes the whole conversation so far; the cache recognises the continuation, keeps the
compressed document and only processes the new tokens.

    python examples/compress_once_ask_twice.py
    python examples/compress_once_ask_twice.py --target PATH --draft PATH
"""

from __future__ import annotations

import torch

from hf_specapprox import SpecKVCache
from _common import load_models, parser


def main(argv=None):
    args = parser(__doc__).parse_args(argv)
    target, draft, tokenizer, prompt = load_models(args)
    inputs = tokenizer(prompt, return_tensors="pt")
    cache = SpecKVCache(draft=draft, model=target, max_capacity_prompt=64, window_size=16, lookahead_tokens=16)
    first = target.generate(**inputs, past_key_values=cache, max_new_tokens=8, do_sample=False)
    rows_after_first = cache.layers[0].keys.shape[-2]

    follow_up = tokenizer(" w5 w6 w7" if not args.target else "\nAnd the colour of the grass? Answer:",
                          return_tensors="pt", add_special_tokens=False)["input_ids"]
    conversation = torch.cat([first, follow_up], dim=1)
    second = target.generate(input_ids=conversation, attention_mask=torch.ones_like(conversation),
                             past_key_values=cache, max_new_tokens=8, do_sample=False)
    print(f"document: {inputs['input_ids'].shape[1]} tokens, kept 64 per layer and KV head")
    print(f"after answer 1: {rows_after_first} rows; after the follow-up: {cache.layers[0].keys.shape[-2]} rows")
    print("answer 1:", tokenizer.decode(first[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True))
    print("answer 2:", tokenizer.decode(second[0, conversation.shape[1]:], skip_special_tokens=True))
    return first, second, cache


if __name__ == "__main__":
    main()
