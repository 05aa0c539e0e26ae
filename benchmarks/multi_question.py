"""Many questions over one long context: accuracy, seconds and memory per turn, on the real pair (or tiny models),
and time per output token of follow-up turns on a KV-bound model.

    python benchmarks/multi_question.py --lengths 2048 --samples 3 --out benchmarks/results/multi-question-2k
    python benchmarks/multi_question.py --tiny --lengths 256 --samples 1 --out /tmp/mq        # seconds, any machine
    python benchmarks/multi_question.py --kv-bound --length 32768 --json benchmarks/results/multi_question_kv_bound.json

Conversations (`hf_specapprox_eval.conversations`): RULER-style contexts with one fact per question; `multi_turn`
asks 3 questions in one chat (each after the previous answers), `multi_request` 4 independent questions over the
context. Methods: `full` (DynamicCache continued / copied per request), `speckv_fresh` (a fresh SpecKV cache per
turn), `speckv_continued` (today's continuation: the KV chosen for the first question), `speckv_retained` (the
retained context, re-selected per question), and the query-agnostic `snapkv_context`, `knorm_context`,
`streamingllm_context` (the context compressed alone once). Budget: 128 KV pairs per layer and KV head; SpecKV's
prefill dense (the retained context is). Rows go to `results.jsonl` (resumable), the table to `summary.md`; ratios are
against `full` and `speckv_fresh` of the same run. Time per turn is the `generate` call (the retained context's and the
compressed context's one-off prefill is `setup s`).

`--kv-bound`: a random-weight Llama shaped so that reading the K/V dominates a decode step at 32K (the long-context
study's `cpu` preset), a context of `--length` tokens and 3 follow-up questions of 32 tokens: seconds per output token
of `generate` on a continued `DynamicCache` against a SpecKV cache with the retained context (budget 1024), medians of
the follow-up turns, each measured after a warm-up turn.
"""

from __future__ import annotations

import argparse
import copy
import datetime
import json
import platform
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if (ROOT / "hf_specapprox").is_dir() and str(ROOT) not in sys.path:  # run from a checkout: use its library
    sys.path.insert(0, str(ROOT))
if (ROOT / "eval" / "hf_specapprox_eval").is_dir() and str(ROOT / "eval") not in sys.path:  # and its harness
    sys.path.insert(0, str(ROOT / "eval"))

import torch  # noqa: E402
import transformers  # noqa: E402

import hf_specapprox as hs  # noqa: E402
from hf_specapprox import compat  # noqa: E402
from hf_specapprox_eval.conversations import (CONVERSATION_METHODS, CONVERSATION_MODES, conversation_table, run_conversations,  # noqa: E402
                                              summarize_conversations)


def conversations(args) -> int:
    torch.set_num_threads(args.threads)
    if args.tiny:
        from hf_specapprox.testing import tiny_pair, tiny_tokenizer

        target, draft = tiny_pair()
        tokenizer = tiny_tokenizer()
    else:
        from hf_specapprox_eval.models import load_pair

        target, draft, tokenizer = load_pair(args.target, args.draft)
    hs.bind(target)
    out = Path(args.out)
    rows = run_conversations(target, draft, tokenizer, modes=args.modes, methods=args.methods, budget=args.budget,
                             context_lengths=args.lengths, num_samples=args.samples, out_path=out / "results.jsonl",
                             max_new_tokens=args.max_new_tokens, haystack=args.haystack)
    table = conversation_table(summarize_conversations(rows))
    meta = (f"{datetime.date.today()} · {platform.processor() or platform.machine()} · torch {torch.__version__} · "
            f"transformers {transformers.__version__} · {torch.get_num_threads()} threads · budget {args.budget}")
    (out / "summary.md").write_text(meta + "\n\n" + table + "\n")
    print(meta)
    print(table)
    return 0


def _kv_bound_models(length: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    def build(layers, hidden, heads, kv_heads, head_dim, mlp, seed):
        config = LlamaConfig(num_hidden_layers=layers, hidden_size=hidden, num_attention_heads=heads,
                             num_key_value_heads=kv_heads, head_dim=head_dim, intermediate_size=mlp, vocab_size=32000,
                             max_position_embeddings=length + 1024, tie_word_embeddings=False)
        config._attn_implementation = "sdpa"
        torch.manual_seed(seed)
        return LlamaForCausalLM(config).eval()

    # the long-context study's `cpu` preset: ~1 GiB of fp32 K/V at 32K dominates a decode step
    return build(4, 256, 16, 16, 64, 512, 0), build(2, 128, 4, 4, 32, 256, 1)


def kv_bound(args) -> int:
    torch.set_num_threads(args.threads)
    target, draft = _kv_bound_models(args.length)
    hs.bind(target)
    generator = torch.Generator().manual_seed(0)
    context = torch.randint(3, 32000, (1, args.length), generator=generator)
    questions = [torch.randint(3, 32000, (1, 32), generator=generator) for _ in range(args.turns + 1)]
    new = args.new_tokens
    kwargs = dict(max_new_tokens=new, min_new_tokens=new, do_sample=False, pad_token_id=0)
    name = compat.cache_kwarg_name(target)

    def conversation(make_cache):
        """TTFT and per-token seconds of every turn (turn 0 is the warm-up), one cache continued across turns."""
        cache, ids, turns = make_cache(), context, []
        for question in questions:
            ids = torch.cat([ids, question], dim=1)
            first = {}

            class FirstToken:
                def __call__(self, input_ids, scores):
                    first.setdefault("t", time.perf_counter())
                    return scores

            start = time.perf_counter()
            out = target.generate(input_ids=ids, attention_mask=torch.ones_like(ids), logits_processor=[FirstToken()],
                                  **{name: cache}, **kwargs)
            total = time.perf_counter() - start
            ttft = first["t"] - start
            turns.append(dict(ttft_s=ttft, tpot_s=(total - ttft) / (new - 1), total_s=total,
                              working_mib=_bytes(cache) / 2**20))
            ids = out
        return turns

    def dynamic():
        cache = transformers.DynamicCache()
        with torch.no_grad():
            target(input_ids=context, use_cache=True, **{name: cache})  # the context, prefilled once
        return cache

    def retained():
        return hs.SpecKVCache(draft=draft, max_capacity_prompt=args.budget, lookahead_tokens=new,
                              sparse_prefill="off").retain_context(target, context)

    rows = {}
    for label, make in (("dynamic_cache", dynamic), ("speckv_retained", retained)):
        start = time.perf_counter()
        turns = conversation(make)
        rows[label] = dict(turns=turns, seconds=time.perf_counter() - start)
        follow = turns[1:]
        rows[label]["followup_tpot_s"] = statistics.median(turn["tpot_s"] for turn in follow)
        rows[label]["followup_ttft_s"] = statistics.median(turn["ttft_s"] for turn in follow)
        print(f"{label}: follow-up TPOT {rows[label]['followup_tpot_s'] * 1e3:.1f} ms, TTFT "
              f"{rows[label]['followup_ttft_s']:.2f} s, working cache {follow[-1]['working_mib']:.1f} MiB", flush=True)
    ratio = rows["speckv_retained"]["followup_tpot_s"] / rows["dynamic_cache"]["followup_tpot_s"]
    result = dict(date=str(datetime.date.today()), machine=platform.processor() or platform.machine(),
                  torch=torch.__version__, transformers=transformers.__version__, threads=torch.get_num_threads(),
                  length=args.length, budget=args.budget, new_tokens=new, turns=args.turns, rows=rows,
                  followup_tpot_ratio=ratio)
    print(f"follow-up TPOT ratio (retained SpecKV / continued DynamicCache): {ratio:.3f}")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))
    return 0


def _bytes(cache) -> int:
    if isinstance(cache, hs.KVCompressionCache):
        return cache.cache_bytes()
    return sum(layer.keys.numel() * layer.keys.element_size() * 2 for layer in cache.layers
               if getattr(layer, "keys", None) is not None and layer.keys.dim() == 4)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--kv-bound", action="store_true", help="the KV-bound decode-time measurement")
    parser.add_argument("--tiny", action="store_true", help="tiny random models")
    parser.add_argument("--target")
    parser.add_argument("--draft")
    parser.add_argument("--modes", nargs="+", default=list(CONVERSATION_MODES), choices=CONVERSATION_MODES)
    parser.add_argument("--methods", nargs="+", default=list(CONVERSATION_METHODS), choices=CONVERSATION_METHODS)
    parser.add_argument("--lengths", nargs="+", type=int, default=[2048])
    parser.add_argument("--samples", type=int, default=3)
    parser.add_argument("--budget", type=int, default=None, help="KV budget (128; 1024 with --kv-bound)")
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--haystack", choices=["noise", "essay"], default="noise")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default="multi-question")
    parser.add_argument("--length", type=int, default=32768, help="--kv-bound: context tokens")
    parser.add_argument("--turns", type=int, default=3, help="--kv-bound: follow-up turns")
    parser.add_argument("--new-tokens", type=int, default=32, help="--kv-bound: tokens per answer")
    parser.add_argument("--json", help="--kv-bound: where to write the result")
    args = parser.parse_args(argv)
    if args.kv_bound:
        args.budget = args.budget or 1024
        return kv_bound(args)
    args.budget = args.budget or 128
    return conversations(args)


if __name__ == "__main__":
    sys.exit(main())
