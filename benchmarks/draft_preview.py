"""How fast can the draft write SpecKV's preview? The library's loop against a static cache, a compiled forward and
optimum-quanto int8 weights, on one prompt, in one process, steady state.

Variants (every one greedy, the draft's generation config in force, `--new-tokens` tokens: EOS is held off with
`min_new_tokens` so that every run decodes the same number of steps):

* `loop`: `hf_specapprox.modeling.draft.generate_lookahead`, what SpecKV runs (dynamic cache, eager): the baseline;
* `generate`: stock `draft.generate(do_sample=False)` (dynamic cache, eager);
* `static`: `draft.generate(..., cache_implementation="static", disable_compile=True)` (preallocated cache, eager);
* `static+compile`: the same, compiled: on a GPU by `generate` itself (its compiled decoding step on a static cache),
  on CPU (where `generate` does not compile) with the draft's forward wrapped in `torch.compile(dynamic=False)`; the
  first call, which compiles, is reported apart;
* `bf16`: the library's loop on the draft cast to bfloat16 (half the weight bytes read per token);
* `quanto-int8`: the library's loop on the draft loaded with transformers' `QuantoConfig(weights="int8")`
  (optimum-quanto), skipped with a note when optimum-quanto is not installed.

For each variant: one warm-up call of each length (reported together as `first_call_s`), then `--runs` timed calls
of one token (the prefill) and of `--new-tokens` tokens; medians. `decode_s_per_token` = (median n-token time −
median one-token time) / (n − 1).
`tokens_equal` says whether the variant's tokens equal the `loop`'s.

    python benchmarks/draft_preview.py --tiny                          # a random-weight smoke test, seconds
    python benchmarks/draft_preview.py --prompt-tokens 2048 --new-tokens 64 --json out.json   # the embedded draft
    python benchmarks/draft_preview.py --device cuda --dtype bfloat16 ...                        # on a GPU
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import tempfile
import time

import torch

VARIANTS = ("loop", "generate", "static", "static+compile", "bf16", "quanto-int8")


def load_draft(args):
    from transformers import AutoModelForCausalLM, Qwen2Config, Qwen2ForCausalLM

    if args.tiny:
        torch.manual_seed(0)
        config = Qwen2Config(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096,
                             eos_token_id=1, pad_token_id=0)
        model = Qwen2ForCausalLM(config).eval()
        model.generation_config.repetition_penalty = 1.1  # as Qwen2.5-Instruct's generation config
        return model, None
    if args.draft:
        path = args.draft
    else:
        from hf_specapprox_eval.models import local_path

        path = str(local_path("draft"))
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation="sdpa").eval()
    return model, path


def synchronize() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def timed(fn) -> tuple[float, object]:
    """`(seconds, fn())`, the device synchronized on both sides."""
    synchronize()
    start = time.perf_counter()
    result = fn()
    synchronize()
    return time.perf_counter() - start, result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--draft", help="a local draft checkpoint (default: the embedded Qwen2.5-Coder-0.5B)")
    parser.add_argument("--tiny", action="store_true", help="a 2-layer random-weight draft (smoke test)")
    parser.add_argument("--prompt-tokens", type=int, default=2048)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    parser.add_argument("--json", help="write {'rows': [...]} here")
    args = parser.parse_args()
    if args.tiny:
        args.prompt_tokens, args.new_tokens, args.runs = min(args.prompt_tokens, 128), min(args.new_tokens, 8), 2

    from transformers import AutoModelForCausalLM

    from hf_specapprox.modeling.draft import generate_lookahead

    torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    draft, path = load_draft(args)
    draft = draft.to(device=args.device, dtype=dtype)
    generator = torch.Generator().manual_seed(0)
    vocab = min(draft.config.vocab_size, 32000)
    input_ids = torch.randint(10, vocab, (1, args.prompt_tokens), generator=generator)
    input_ids = input_ids.to(args.device)
    attention_mask = torch.ones_like(input_ids)

    def with_min_tokens(model, n):
        model.generation_config.min_new_tokens = n  # EOS held off: every run decodes the same number of steps
        return model

    def loop_call(model):
        def call(n):
            with_min_tokens(model, n)
            return generate_lookahead(model, input_ids, attention_mask, n)[0]
        return call

    def generate_call(model, **kwargs):
        def call(n):
            with_min_tokens(model, n)
            out = model.generate(input_ids, attention_mask=attention_mask, do_sample=False, max_new_tokens=n,
                                 **kwargs)
            return out[:, input_ids.shape[1]:]
        return call

    calls = {}
    for variant in args.variants:
        if variant == "loop":
            calls[variant] = loop_call(draft)
        elif variant == "generate":
            calls[variant] = generate_call(draft)
        elif variant == "static":
            calls[variant] = generate_call(draft, cache_implementation="static", disable_compile=True)
        elif variant == "static+compile":
            compiled = copy.deepcopy(draft)
            if torch.device(args.device).type == "cpu":  # elsewhere `generate` compiles its decoding step itself
                compiled.forward = torch.compile(compiled.forward, dynamic=False)
            calls[variant] = generate_call(compiled, cache_implementation="static")
        elif variant == "bf16":
            calls[variant] = loop_call(copy.deepcopy(draft).to(torch.bfloat16))
        elif variant == "quanto-int8":
            try:
                from transformers import QuantoConfig

                with tempfile.TemporaryDirectory() as folder:
                    if path is None:  # the tiny draft: through a checkpoint, as a user loads one
                        draft.save_pretrained(folder)
                    quantized = AutoModelForCausalLM.from_pretrained(
                        path or folder, dtype=dtype, quantization_config=QuantoConfig(weights="int8")).eval()
                quantized = quantized.to(args.device)
            except ImportError as error:  # optimum-quanto missing
                print(f"quanto-int8 skipped: {error}")
                continue
            quantized.generation_config = copy.deepcopy(draft.generation_config)
            calls[variant] = loop_call(quantized)

    rows, reference = [], None
    n = args.new_tokens
    with torch.no_grad():
        for variant, call in calls.items():
            # Warm-up: both shapes once (a static cache's length depends on the number of new tokens, so a compiled
            # forward compiles for each); reported apart.
            first_call_s = timed(lambda: call(n))[0] + timed(lambda: call(1))[0]
            one = [timed(lambda: call(1))[0] for _ in range(args.runs)]
            full = [timed(lambda: call(n)) for _ in range(args.runs)]
            tokens = full[-1][1]
            full = [seconds for seconds, _ in full]
            if reference is None:
                reference = tokens
            prefill_s, total_s = statistics.median(one), statistics.median(full)
            rows.append({
                "variant": variant, "prompt_tokens": args.prompt_tokens, "new_tokens": n,
                "first_call_s": first_call_s, "prefill_s": prefill_s, "total_s": total_s,
                "decode_s_per_token": (total_s - prefill_s) / max(n - 1, 1),
                "tokens_equal": bool(tokens.shape == reference.shape and torch.equal(tokens, reference)),
                "runs": args.runs,
            })
            print(f"{variant}: done", flush=True)

    base = rows[0]
    print(f"\ndraft: {path or 'tiny random weights'}; prompt {args.prompt_tokens} tokens, {n} new tokens, "
          f"{args.threads} threads, {args.device}, {args.dtype}, torch {torch.__version__}, medians of {args.runs}; "
          f"ratios against `{base['variant']}`")
    print("| variant | first call s | prefill s | decode s/token | total s | total vs base | decode vs base "
          "| tokens equal |")
    print("|---|---|---|---|---|---|---|---|")
    for row in rows:
        print(f"| {row['variant']} | {row['first_call_s']:.2f} | {row['prefill_s']:.3f} | "
              f"{row['decode_s_per_token']:.4f} | {row['total_s']:.2f} | {row['total_s'] / base['total_s']:.2f} | "
              f"{row['decode_s_per_token'] / base['decode_s_per_token']:.2f} | {row['tokens_equal']} |")
    if args.json:
        with open(args.json, "w") as handle:
            json.dump({"rows": rows}, handle, indent=1)


if __name__ == "__main__":
    main()
