"""One SpecKV cache in transformers' stock `text-generation` pipeline, for several prompts.

Each `generate` call of a bound model compares its ids with what the cache consumed: a prompt that does not continue
them starts over, exactly as a fresh cache would. The script checks that against a fresh cache per prompt.

    python examples/shared_cache_pipeline.py                              # tiny random models, seconds
    python examples/shared_cache_pipeline.py --target PATH --draft PATH  # a real pair sharing a tokenizer
"""

from __future__ import annotations

from transformers import pipeline

import hf_specapprox
from hf_specapprox import SpecKVCache
from _common import load_models, parser


def main(argv=None):
    args = parser(__doc__).parse_args(argv)
    target, draft, tokenizer, prompt = load_models(args)
    hf_specapprox.bind(target)
    pipe = pipeline("text-generation", model=target, tokenizer=tokenizer, device=target.device)
    words = prompt.split()
    prompts = [" ".join(words[: len(words) * share // 4]) for share in (4, 2, 3)]  # longer, shorter, in between
    cache_name = hf_specapprox.compat.cache_kwarg_name(target)  # "cache" from transformers 5.24 on
    knobs = dict(max_capacity_prompt=64, window_size=16, lookahead_tokens=8)
    shared = SpecKVCache(draft=draft, **knobs)
    settings = dict(max_new_tokens=8, do_sample=False, return_full_text=False)
    answers = []
    for text in prompts:
        with_shared = pipe(text, **{cache_name: shared}, **settings)[0]["generated_text"]
        with_fresh = pipe(text, **{cache_name: SpecKVCache(draft=draft, **knobs)}, **settings)[0]["generated_text"]
        answers.append((with_shared, with_fresh))
        print(f"{len(tokenizer(text)['input_ids'])} prompt tokens | shared cache: {with_shared!r} | "
              f"fresh cache: {with_fresh!r} | same: {with_shared == with_fresh}")
    return answers


if __name__ == "__main__":
    main()
