"""The `speckv-text-generation` pipeline with each method, on a batch of prompts, with its compression numbers.

    python examples/pipeline_methods.py
    python examples/pipeline_methods.py --target PATH --draft PATH
"""

from __future__ import annotations

from transformers import pipeline

import hf_specapprox
from _common import load_models, parser


def main(argv=None):
    args = parser(__doc__).parse_args(argv)
    target, draft, tokenizer, prompt = load_models(args)
    prompts = [prompt, prompt[: len(prompt) // 3]]
    results = {}
    for method in ("speckv", "specpc", "speckv-pc"):
        pipe = pipeline(
            "speckv-text-generation", model=target, tokenizer=tokenizer, draft_model=draft, method=method,
            speckv_config=hf_specapprox.SpecKVConfig(max_capacity_prompt=64, window_size=16, lookahead_tokens=16),
            specpc_config=hf_specapprox.SpecPCConfig(max_capacity_prompt=128, window_size=16, kernel_size=8,
                                                     starting_layer_index=1, lookahead_tokens=8),
        )
        results[method] = pipe(prompts, max_new_tokens=12, do_sample=False, batch_size=2, return_full_text=False)
        for output in results[method]:
            print(method, output[0]["hf_specapprox"], repr(output[0]["generated_text"][:60]))
    return results


if __name__ == "__main__":
    main()
