"""`hf-specapprox`: env, demo, eval, chat-eval, bench, compress.

    hf-specapprox env                               # versions, devices, threads (for bug reports)
    hf-specapprox demo                              # full target vs SpecKV vs SpecPC vs SpecKV-PC on a long prompt
    hf-specapprox eval --tasks niah_single vt --methods full speckv snapkv --budgets 128 256 --lengths 2048
    hf-specapprox chat-eval --methods full speckv_retained --lengths 2048  # many questions over one long context
    hf-specapprox bench --methods full speckv snapkv specpc --length 2048   # seconds + peak memory, fresh processes
    hf-specapprox compress notes.txt --budget 512   # SpecPC on a text file -> notes.compressed.txt + .stats.json

Models: the embedded Qwen2.5-Coder pair by default (see `hf_specapprox_eval.models`), `--target PATH --draft PATH` for
local checkpoints, or `--tiny` for random tiny models (seconds; for trying the commands).
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import sys
import time
from pathlib import Path


def positive_int(value: str) -> int:
    """argparse type: an integer >= 1 (budgets, lengths, counts); anything else is a one-line usage error."""
    try:
        number = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value!r}") from None
    if number < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer (>= 1), got {number}")
    return number


def _read_text(path: str) -> str:
    """The text of `path`, or a one-line `SystemExit` when it is missing, unreadable, not text or empty."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise SystemExit(f"hf-specapprox: error: {path}: no such file") from None
    except UnicodeDecodeError:
        raise SystemExit(f"hf-specapprox: error: {path}: not UTF-8 text") from None
    except OSError as error:
        raise SystemExit(f"hf-specapprox: error: {path}: cannot read it ({error.strerror or error})") from None
    if not text.strip():
        raise SystemExit(f"hf-specapprox: error: {path}: the file is empty, nothing to compress")
    return text


def _same_file(path: Path, other: Path) -> bool:
    """Whether two paths name one file: the same inode where both exist (hard links, symlinks, `..`), else the same
    resolved path."""
    if path.exists() and other.exists():
        return os.path.samefile(path, other)
    return path.resolve() == other.resolve()


def compress_output_paths(file: str, out: str | None, readable: bool = False) -> tuple[Path, ...]:
    """Where `compress` writes the compressed text (`--out`, default `<file stem>.compressed.txt`), its stats (the
    text path with the suffix `.stats.json`) and, with `readable`, the readable text (suffix `.readable.txt`); a
    one-line `SystemExit` if one would overwrite the input or another (compared by identity: a hard link to the
    input is the input), or if its folder does not exist."""
    source = Path(file)
    text_path = Path(out) if out else source.with_suffix(".compressed.txt")
    paths = [(text_path, "--out"), (text_path.with_suffix(".stats.json"), "the stats file")]
    if readable:
        paths.append((text_path.with_suffix(".readable.txt"), "the readable text"))
    for path, _ in paths:
        if path.is_dir():
            raise SystemExit(f"hf-specapprox: error: {path} is a folder; --out takes a file path")
        if not path.parent.is_dir():
            raise SystemExit(f"hf-specapprox: error: {path.parent} does not exist; create it or choose another --out")
    taken = [(source, "the input file")]
    for path, what in paths:
        for other, other_what in taken:
            if _same_file(path, other):
                raise SystemExit(f"hf-specapprox: error: {what} {path} would overwrite {other_what}; "
                                 f"choose another --out")
        taken.append((path, what))
    return tuple(path for path, _ in paths)


def _add_model_args(parser):
    parser.add_argument("--target", help="local target checkpoint directory")
    parser.add_argument("--draft", help="local draft checkpoint directory (same tokenizer)")
    parser.add_argument("--tiny", action="store_true", help="tiny random models (for trying the commands)")
    parser.add_argument("--threads", type=positive_int, help="torch CPU threads")


def _models(args):
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.tiny:
        from hf_specapprox.testing import tiny_pair, tiny_tokenizer

        target, draft = tiny_pair()
        return target, draft, tiny_tokenizer()
    from .models import load_pair

    return load_pair(args.target, args.draft)


def cmd_env(args) -> int:
    import torch
    import transformers

    from hf_specapprox import __version__
    from hf_specapprox.kernels import triton_is_usable

    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = "not installed"
    info = {
        "hf_specapprox": __version__, "python": platform.python_version(), "platform": platform.platform(),
        "torch": torch.__version__, "transformers": transformers.__version__, "triton": triton_version,
        "triton_usable": triton_is_usable(), "cuda": torch.cuda.is_available(),
        "cuda_devices": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())],
        "cpu_threads": torch.get_num_threads(), "cpu_count": os.cpu_count(),
        "HF_HUB_OFFLINE": os.environ.get("HF_HUB_OFFLINE"),
    }
    for key, value in info.items():
        print(f"{key}: {value}")
    return 0


def _parse_shard(value: str | None):
    """`"i/n"` → `(i, n)`; `"auto"` → `(RANK, WORLD_SIZE)` as set by `torchrun` / `accelerate launch` (or None)."""
    if value is None:
        return None
    if value == "auto":
        if "WORLD_SIZE" not in os.environ:
            return None
        return int(os.environ.get("RANK", os.environ.get("LOCAL_RANK", "0"))), int(os.environ["WORLD_SIZE"])
    try:
        index, count = (int(part) for part in value.split("/"))
    except ValueError:
        raise SystemExit(f"--shard takes INDEX/COUNT (e.g. 0/4) or auto, got {value!r}") from None
    if not 0 <= index < count:
        raise SystemExit(f"--shard {value}: INDEX must be in 0..COUNT-1")
    return index, count


def cmd_eval(args) -> int:
    from . import markdown_table, plot, run_eval, summarize

    shard = _parse_shard(args.shard)
    out = Path(args.out)
    if args.summarize_only:
        from .runner import read_merged_results

        wanted = {(t, i, length) for length in args.lengths for t in args.tasks for i in range(args.samples)}
        rows = [row for row in read_merged_results(out / "results.jsonl")
                if (row["task"], row["index"], row["context_length"]) in wanted and row["method"] in args.methods]
        if not rows:
            raise SystemExit(f"No results in {out} for these tasks, methods, lengths and samples.")
    else:
        target, draft, tokenizer = _models(args)
        rows = run_eval(target, draft, tokenizer, tasks=args.tasks, methods=args.methods, budgets=args.budgets,
                        context_lengths=args.lengths, num_samples=args.samples, out_path=out / "results.jsonl",
                        prompt_budgets=args.prompt_budgets, pc_budget=args.pc_budget, haystack=args.haystack,
                        seed=args.seed, shard=shard)
    summary = summarize(rows)
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    with open(out / "summary.csv", "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["context_length", "method", "budget", "samples", "score", "seconds"])
        writer.writerows([[r["context_length"], r["method"], r["budget"], r["samples"], r["score"], r["seconds"]]
                          for r in summary])
    table = markdown_table(summary)
    (out / "summary.md").write_text(table + "\n")
    plot(summary, out / "accuracy_vs_budget.png")
    print(table)
    print(f"results: {out / 'results.jsonl'}, plot: {out / 'accuracy_vs_budget.png'}")
    return 0


def cmd_demo(args) -> int:
    import torch

    from . import make_sample, run_method, score
    from .progress import TokenProgress, say, stage_lines, wanted

    show = wanted(args.quiet)
    if not (args.tiny or args.target):
        from .models import cache_dir

        print(f"models: the embedded Qwen2.5-Coder pair (see docs/models.md), converted once into {cache_dir()} "
              "(~9 GB; set HF_SPECAPPROX_CACHE to put it elsewhere); about 10 GB of RAM while it runs")
    say(show, "loading the models ...")
    target, draft, tokenizer = _models(args)
    sample = make_sample("niah_single", 0, tokenizer, args.length)
    encoded = tokenizer(sample.prompt, return_tensors="pt", add_special_tokens=False)
    prompt_tokens = encoded["input_ids"].shape[1]
    print(f"prompt: {prompt_tokens} tokens; question: the hidden number; answer {sample.answers}")
    methods = (("full", None), ("speckv", args.budget), ("specpc", args.pc_budget), ("speckv_pc", args.budget))
    rows = []
    for number, (method, budget) in enumerate(methods, 1):
        say(show, f"[{number}/{len(methods)}] {method}" + (f" (budget {budget})" if budget else "") + " ...")
        start = time.perf_counter()
        with torch.no_grad(), stage_lines(show):
            progress = TokenProgress(args.max_new_tokens, f"{method}: decoding", enabled=show)
            tokens, stats = run_method(method, target, draft, encoded["input_ids"], encoded["attention_mask"],
                                       budget=budget, max_new_tokens=args.max_new_tokens, pc_budget=args.pc_budget,
                                       streamer=progress)
        seconds = time.perf_counter() - start
        answer = tokenizer.decode(tokens[0], skip_special_tokens=True).strip().replace("\n", " ")
        kept = stats.get("kept_tokens", [None])[0] if method != "speckv" else f"{budget} KV/layer"
        rows.append((method, budget, kept or prompt_tokens, seconds, stats["kv_bytes"] / 2**20, answer,
                     score(answer, sample.answers, sample.metric) == 100))
    full_mib, full_seconds = rows[0][4], rows[0][3]
    print("| method | budget | kept | KV cache MiB | vs full | seconds | vs full | answer | correct |\n"
          "|---|---|---|---|---|---|---|---|---|")
    for method, budget, kept, seconds, mib, answer, correct in rows:
        print(f"| {method} | {budget or '—'} | {kept} | {mib:.1f} | {mib / full_mib:.2f} | {seconds:.1f} | "
              f"{seconds / full_seconds:.2f} | {answer[:50]!r} | {'yes' if correct else 'no'} |")
    speckv = rows[1]
    print(f"SpecKV keeps {speckv[4]:.1f} MiB of keys and values where the full target keeps {full_mib:.1f} MiB "
          f"({full_mib / max(speckv[4], 1e-9):.0f}x less): the memory that decoding reads per token and that "
          "batches share. It is also faster when the target's attention over the prompt dominates the time: on "
          "CPUs measured here, from prompts of about 8-32K tokens on (docs/budgets.md, \"When SpecKV is faster\"); "
          f"at {prompt_tokens} tokens the draft's preview costs more than it saves.")
    return 0


def cmd_chat_eval(args) -> int:
    from .conversations import conversation_table, run_conversations, summarize_conversations
    from .progress import stage_lines, wanted

    target, draft, tokenizer = _models(args)
    import hf_specapprox

    hf_specapprox.bind(target)
    out = Path(args.out)
    with stage_lines(wanted(args.quiet)):
        rows = run_conversations(target, draft, tokenizer, modes=args.modes, methods=args.methods, budget=args.budget,
                                 context_lengths=args.lengths, num_samples=args.samples,
                                 out_path=out / "results.jsonl", turns=args.turns, requests=args.requests,
                                 max_new_tokens=args.max_new_tokens, haystack=args.haystack, seed=args.seed)
    table = conversation_table(summarize_conversations(rows))
    (out / "summary.md").write_text(table + "\n")
    print(table)
    print(f"results: {out / 'results.jsonl'}")
    return 0


def cmd_bench(args) -> int:
    from . import bench_table, run_bench

    rows = run_bench(args.methods, target=args.target, draft=args.draft, tiny=args.tiny, length=args.length,
                     budget=args.budget, pc_budget=args.pc_budget, max_new_tokens=args.max_new_tokens,
                     task=args.task, threads=args.threads, device=args.device)
    table = bench_table(rows)
    print(table)
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "bench.json").write_text(json.dumps(rows, indent=1))
        (out / "bench.md").write_text(table + "\n")
    return 0


def _draft_only(args):
    """`(draft, tokenizer)`: SpecPC needs no target, so none is loaded."""
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.tiny:
        from hf_specapprox.testing import tiny_pair, tiny_tokenizer

        return tiny_pair()[1], tiny_tokenizer()
    from .models import load_draft

    return load_draft(args.draft)


def cmd_compress(args) -> int:
    from hf_specapprox.prompt.specpc import SpecPCPreprocessor

    from .methods import specpc_window, voting_layer

    text = _read_text(args.file)  # bad files and paths fail before the models load
    paths = compress_output_paths(args.file, args.out, readable=args.readable is not None)
    from .progress import say, wanted

    say(wanted(args.quiet), "loading the draft (SpecPC needs no target) ...")
    draft, tokenizer = _draft_only(args)
    say(wanted(args.quiet), f"compressing {args.file} to {args.budget} tokens ...")
    specpc = SpecPCPreprocessor(draft, tokenizer=tokenizer, max_capacity_prompt=args.budget,
                                window_size=specpc_window(args.budget), starting_layer_index=voting_layer(draft))
    compressed_text, output = specpc.compress_text(text)
    paths[0].write_text(compressed_text, encoding="utf-8")
    stats = {key: (value[0] if isinstance(value, list) else value) for key, value in output.stats.items()}
    paths[1].write_text(json.dumps(stats, indent=1))
    if args.readable is not None:
        readable, _ = specpc.compress_text(text, separator=args.readable)
        paths[2].write_text(readable, encoding="utf-8")
    print(json.dumps(stats))
    print(f"compressed text: {paths[0]}, stats: {paths[1]}" + (f", readable text: {paths[2]}" if len(paths) > 2
                                                                  else ""), file=sys.stderr)
    return 0


def build_parser() -> argparse.ArgumentParser:
    from . import HARNESS_METHODS, TASKS

    parser = argparse.ArgumentParser(prog="hf-specapprox", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("env", help="versions and devices").set_defaults(func=cmd_env)

    demo = commands.add_parser("demo", help="all methods on one long prompt")
    _add_model_args(demo)
    demo.add_argument("--length", type=positive_int, default=2048)
    demo.add_argument("--budget", type=positive_int, default=128)
    demo.add_argument("--pc-budget", type=positive_int, default=512)
    demo.add_argument("--max-new-tokens", type=positive_int, default=24)
    demo.add_argument("--quiet", action="store_true", help="no progress lines or bars (none when not a terminal)")
    demo.set_defaults(func=cmd_demo)

    evaluate = commands.add_parser("eval", help="the offline evaluation harness")
    _add_model_args(evaluate)
    evaluate.add_argument("--tasks", nargs="+", default=["niah_single", "niah_multikey", "vt", "qa"], choices=TASKS)
    evaluate.add_argument("--methods", nargs="+", default=["full", "speckv", "snapkv"], choices=sorted(HARNESS_METHODS))
    evaluate.add_argument("--budgets", nargs="+", type=positive_int, default=[128, 256], help="KV budgets")
    evaluate.add_argument("--prompt-budgets", nargs="+", type=positive_int, default=[512, 1024],
                          help="prompt budgets of SpecPC and SpecPrefill")
    evaluate.add_argument("--pc-budget", type=positive_int, default=2048,
                          help="SpecKV-PC's first-stage prompt budget (2048 as released)")
    evaluate.add_argument("--lengths", nargs="+", type=positive_int, default=[2048])
    evaluate.add_argument("--samples", type=positive_int, default=8)
    evaluate.add_argument("--haystack", choices=["noise", "essay"], default="noise")
    evaluate.add_argument("--seed", type=int, default=0)
    evaluate.add_argument("--out", default="specapprox-eval")
    evaluate.add_argument("--summarize-only", action="store_true",
                          help="summarise what the result files of --out hold (all budgets), compute nothing")
    evaluate.add_argument("--shard", help="INDEX/COUNT: this process's share of the samples (own results file, "
                          "merged on read); `auto` takes RANK/WORLD_SIZE from torchrun or accelerate launch")
    evaluate.set_defaults(func=cmd_eval)

    from .conversations import CONVERSATION_METHODS, CONVERSATION_MODES

    chat = commands.add_parser("chat-eval", help="many questions over one long context: multi-turn chats and "
                               "multi-request services (see docs/chat.md)")
    _add_model_args(chat)
    chat.add_argument("--modes", nargs="+", default=list(CONVERSATION_MODES), choices=CONVERSATION_MODES)
    chat.add_argument("--methods", nargs="+", default=["full", "speckv_fresh", "speckv_retained"],
                      choices=CONVERSATION_METHODS)
    chat.add_argument("--budget", type=positive_int, default=128, help="KV budget of every compressing method")
    chat.add_argument("--lengths", nargs="+", type=positive_int, default=[2048])
    chat.add_argument("--samples", type=positive_int, default=3, help="conversations per mode and length")
    chat.add_argument("--turns", type=positive_int, default=3, help="questions of a multi-turn chat")
    chat.add_argument("--requests", type=positive_int, default=4, help="questions of a multi-request context")
    chat.add_argument("--max-new-tokens", type=positive_int, default=32)
    chat.add_argument("--haystack", choices=["noise", "essay"], default="noise")
    chat.add_argument("--seed", type=int, default=0)
    chat.add_argument("--out", default="specapprox-chat-eval")
    chat.add_argument("--quiet", action="store_true", help="no stage lines (none when not a terminal)")
    chat.set_defaults(func=cmd_chat_eval)

    bench = commands.add_parser("bench", help="seconds and peak memory per method, each in a fresh process")
    _add_model_args(bench)
    bench.add_argument("--methods", nargs="+", default=["full", "speckv", "snapkv", "specpc", "speckv_pc"],
                       choices=sorted(HARNESS_METHODS))
    bench.add_argument("--task", default="niah_single", choices=TASKS)
    bench.add_argument("--length", type=positive_int, default=2048)
    bench.add_argument("--budget", type=positive_int, default=128, help="KV budget")
    bench.add_argument("--pc-budget", type=positive_int, default=512, help="prompt budget")
    bench.add_argument("--max-new-tokens", type=positive_int, default=24)
    bench.add_argument("--device", default="cpu", help="cpu or cuda")
    bench.add_argument("--out", help="folder for bench.json and bench.md")
    bench.set_defaults(func=cmd_bench)

    compress = commands.add_parser("compress", help="SpecPC on a text file")
    _add_model_args(compress)
    compress.add_argument("file")
    compress.add_argument("--budget", type=positive_int, default=1024,
                          help="prompt tokens kept (SpecPC's window is min(64, budget))")
    compress.add_argument("--out", help="compressed text (default: FILE with suffix .compressed.txt); "
                          "the stats go beside it, suffix .stats.json")
    compress.add_argument("--quiet", action="store_true", help="no progress lines (none when not a terminal)")
    compress.add_argument("--readable", nargs="?", const=" … ", default=None, metavar="MARKER",
                          help="also write a text for people (suffix .readable.txt) with MARKER (default ' … ') "
                          "between the kept spans; the compressed text itself stays exactly the kept tokens")
    compress.set_defaults(func=cmd_compress)
    return parser


def main(argv=None) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
