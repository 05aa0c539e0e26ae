"""SpecKV-PC: SpecPC shortens the prompt, then SpecKV compresses its KV cache, the draft running only once.

    python examples/speckv_pc.py
    python examples/speckv_pc.py --target PATH --draft PATH
"""

from __future__ import annotations

from hf_specapprox import SpecKVConfig, SpecKVPC, SpecPCConfig
from _common import load_models, parser


def main(argv=None):
    args = parser(__doc__).parse_args(argv)
    target, draft, tokenizer, prompt = load_models(args)
    inputs = tokenizer(prompt, return_tensors="pt")
    cascade = SpecKVPC(
        draft,
        SpecPCConfig(max_capacity_prompt=192, window_size=32, kernel_size=16, lookahead_tokens=16,
                     starting_layer_index=1 if not args.target else 8),
        SpecKVConfig(max_capacity_prompt=64, window_size=16),
    )
    compressed, out = cascade.compress_and_generate(target, inputs["input_ids"], inputs["attention_mask"],
                                                    max_new_tokens=12, do_sample=False)
    print(f"prompt {compressed.stats['original_tokens'][0]} tokens -> SpecPC kept "
          f"{compressed.stats['kept_tokens'][0]} -> SpecKV keeps 64 per layer and KV head")
    print("answer:", tokenizer.decode(out[0, compressed.input_ids.shape[1]:], skip_special_tokens=True))
    return out, compressed


if __name__ == "__main__":
    main()
