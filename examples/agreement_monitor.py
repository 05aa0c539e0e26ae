"""How far the target's answer follows the draft's preview: a per-response confidence signal, for free.

    python examples/agreement_monitor.py
    python examples/agreement_monitor.py --target PATH --draft PATH
"""

from __future__ import annotations

from hf_specapprox import DraftAgreementMonitor, SpecKVCache
from _common import load_models, parser


def main(argv=None):
    args = parser(__doc__).parse_args(argv)
    target, draft, tokenizer, prompt = load_models(args)
    inputs = tokenizer(prompt, return_tensors="pt")
    cache = SpecKVCache(draft=draft, model=target, max_capacity_prompt=64, window_size=16, lookahead_tokens=16)
    monitor = DraftAgreementMonitor(cache)  # reads the draft's tokens from the cache after the prefill
    out = target.generate(**inputs, past_key_values=cache, logits_processor=[monitor], max_new_tokens=16,
                          do_sample=False)
    agreement, prefix = monitor.agreement(out)[0].item(), monitor.matched_prefix(out)[0].item()
    print(f"draft preview: {tokenizer.decode(cache.lookahead_ids[0][cache.lookahead_valid[0]])!r}")
    print(f"answer:        {tokenizer.decode(out[0, inputs['input_ids'].shape[1]:])!r}")
    print(f"agreement {agreement:.2f}, first {prefix} answer tokens equal to the draft's")
    return agreement, prefix


if __name__ == "__main__":
    main()
