"""SpecKV with stock `generate`: a batch of two long prompts of different lengths, compressed to a 64-token KV budget.

    python examples/speckv_generate.py                                   # tiny random models, seconds
    python examples/speckv_generate.py --target PATH --draft PATH       # a real pair sharing a tokenizer
"""

from __future__ import annotations

import hf_specapprox
from hf_specapprox import SpecKVCache
from _common import load_models, parser


def main(argv=None):
    args = parser(__doc__).parse_args(argv)
    target, draft, tokenizer, prompt = load_models(args)
    inputs = tokenizer([prompt, prompt[: len(prompt) // 2]], return_tensors="pt", padding=True)  # left-padded

    hf_specapprox.bind(target)  # once per target model
    cache = SpecKVCache(draft=draft, max_capacity_prompt=64, window_size=16, lookahead_tokens=16)
    out = target.generate(**inputs, past_key_values=cache, max_new_tokens=16, do_sample=False)

    prompt_length = inputs["input_ids"].shape[1]
    print(f"prompt: {prompt_length} tokens (padded); kept per layer and KV head: 64 + the last prompt token")
    print(f"cache: {cache.get_seq_length()} tokens seen, {cache.layers[0].keys.shape[-2]} rows stored per layer, "
          f"{cache.cache_bytes() / 1024:.0f} KiB (a DynamicCache would hold {out.shape[1] - 1} rows)")
    for row, text in enumerate(tokenizer.batch_decode(out[:, prompt_length:], skip_special_tokens=True)):
        print(f"answer {row}: {text}")
    return out, cache


if __name__ == "__main__":
    main()
