"""What SpecPC in front of a serving engine adds per request on CPU: `transformers serve` on 127.0.0.1, the same
prompts sent in full and through `SpecPCClient` (the draft compresses here, the shorter prompt goes to the server).

Target (served): a random-weight Llama, 4 layers, hidden 256, 8 query / 8 KV heads x 32, MLP 1024, fp32, saved to a
temporary folder with the in-process word-level tokenizer (97 ids) and no EOS, so every answer is `--max-tokens`
tokens long. Draft (local): a random-weight Llama, 2 layers, hidden 128. Prompts: `--length` random words (one token
each). `transformers serve` takes text prompts only, so both paths send text (SpecPC: its kept tokens, decoded).

Each round sends one full-prompt request and one SpecPC request (order alternating, a different prompt per round),
after one warm-up of each; the table shows medians, and the fastest of each piece (the least disturbed on a shared
machine; SpecPC's end-to-end there = fastest compression + fastest request; the 1-minute load average at start and
end is recorded). Timings: full = the HTTP request (sending until the whole answer
is in); SpecPC = compress (tokenizing, the draft, decoding the kept tokens) + its HTTP request; ratio = SpecPC
end-to-end / full. With `--stream`, the time to the first streamed chunk is measured too.

    python benchmarks/serving_latency.py --length 2048 --requests 8 --json out.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import torch
import transformers
from transformers import LlamaConfig, LlamaForCausalLM

from hf_specapprox import SpecPCClient, SpecPCConfig, SpecPCPreprocessor
from hf_specapprox.testing import BOS_ID, PAD_ID, VOCAB, tiny_tokenizer, words

DIRECT = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # loopback: never through a proxy


def llama(layers: int, hidden: int, heads: int, mlp: int, seed: int):
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=hidden, intermediate_size=mlp, num_hidden_layers=layers,
                         num_attention_heads=heads, num_key_value_heads=heads, max_position_embeddings=16384,
                         pad_token_id=PAD_ID, bos_token_id=BOS_ID, eos_token_id=None, tie_word_embeddings=False)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).eval()
    model.generation_config.eos_token_id = None
    return model


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_server(folder: Path, port: int, log: Path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_DISABLE_UPDATE_CHECK": "1", "HF_HUB_DISABLE_TELEMETRY": "1",
           "TOKENIZERS_PARALLELISM": "false"}
    process = subprocess.Popen(
        [sys.executable, "-m", "transformers.cli.transformers", "serve", str(folder), "--host", "127.0.0.1",
         "--port", str(port), "--device", "cpu", "--log-level", "warning"],
        stdout=log.open("w"), stderr=subprocess.STDOUT, env=env)
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise SystemExit(f"`transformers serve` exited ({process.returncode}):\n{log.read_text()[-3000:]}")
        try:
            with DIRECT.open(f"http://127.0.0.1:{port}/v1/models", timeout=2):
                return process
        except OSError:
            time.sleep(0.5)
    process.terminate()
    raise SystemExit("`transformers serve` did not start within 180 s")


def full_request(url: str, model: str, prompt: str, max_tokens: int, stream: bool):
    """The plain request: `(seconds, first_chunk_seconds or None, prompt_tokens, completion_tokens)`."""
    payload = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0.0, "stream": stream}
    if stream:
        payload["stream_options"] = {"include_usage": True}
    request = urllib.request.Request(url, data=json.dumps(payload).encode(), method="POST",
                                     headers={"Content-Type": "application/json"})
    start = time.perf_counter()
    first, usage = None, {}
    with DIRECT.open(request, timeout=300) as response:
        if not stream:
            answer = json.loads(response.read())
            return time.perf_counter() - start, None, answer["usage"]["prompt_tokens"], \
                answer["usage"]["completion_tokens"]
        for line in response:
            line = line.decode().strip()
            if not line.startswith("data:") or line == "data: [DONE]":
                continue
            event = json.loads(line[5:])
            if event.get("choices") and event["choices"][0].get("text") and first is None:
                first = time.perf_counter() - start
            usage = event.get("usage") or usage
    return time.perf_counter() - start, first, usage.get("prompt_tokens"), usage.get("completion_tokens")


def specpc_request(client: SpecPCClient, prompt: str, max_tokens: int, stream: bool):
    if not stream:
        result = client.complete(prompt, max_tokens=max_tokens, temperature=0.0)
    else:
        result = client.complete(prompt, max_tokens=max_tokens, temperature=0.0, stream=True,
                                 stream_options={"include_usage": True})
        for _ in result:
            pass
        result = result.result
    return result.stats


def median(values):
    return statistics.median(values) if values else float("nan")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--length", type=int, default=2048, help="prompt tokens")
    parser.add_argument("--budget", type=int, default=512, help="SpecPC's max_capacity_prompt")
    parser.add_argument("--requests", type=int, default=8, help="timed requests per path")
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--lookahead", type=int, default=8, help="the draft's lookahead tokens")
    parser.add_argument("--stream", action="store_true", help="stream the answers, measure the first chunk too")
    parser.add_argument("--json", help="write the raw rows and medians here")
    args = parser.parse_args(argv)

    tokenizer = tiny_tokenizer()
    target = llama(layers=4, hidden=256, heads=8, mlp=1024, seed=0)
    draft = llama(layers=2, hidden=128, heads=4, mlp=256, seed=1)
    specpc = SpecPCPreprocessor(draft, SpecPCConfig(max_capacity_prompt=args.budget, window_size=32, kernel_size=32,
                                                    lookahead_tokens=args.lookahead, starting_layer_index=1))
    environment = {"date": time.strftime("%Y-%m-%d"), "machine": platform.processor() or platform.machine(),
                   "cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
                   "transformers": transformers.__version__, "python": platform.python_version(),
                   "load_average_1min_at_start": round(os.getloadavg()[0], 2)}
    prompts = [words(args.length, seed=100 + i) for i in range(args.requests + 1)]
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        served = Path(folder) / "target"
        target.save_pretrained(served)
        tokenizer.save_pretrained(served)
        del target
        port = free_port()
        server = start_server(served, port, Path(folder) / "serve.log")
        try:
            base_url = f"http://127.0.0.1:{port}/v1"
            client = SpecPCClient(specpc, base_url, str(served), tokenizer=tokenizer, prompt_format="text",
                                  timeout=300)
            for round_ in range(args.requests + 1):  # round 0: the warm-up
                prompt = prompts[round_]
                order = ("full", "specpc") if round_ % 2 == 0 else ("specpc", "full")
                for path in order:
                    if path == "full":
                        seconds, first, prompt_tokens, completion = full_request(
                            base_url + "/completions", str(served), prompt, args.max_tokens, args.stream)
                        row = {"path": "full", "request_seconds": seconds, "first_chunk_seconds": first,
                               "prompt_tokens": prompt_tokens, "completion_tokens": completion}
                    else:
                        stats = specpc_request(client, prompt, args.max_tokens, args.stream)
                        row = {"path": "specpc", "compress_seconds": stats["compress_seconds"],
                               "draft_seconds": stats["draft_seconds"], "request_seconds": stats["request_seconds"],
                               "first_chunk_seconds": stats.get("first_chunk_seconds"),
                               "prompt_tokens": stats["server_prompt_tokens"], "kept_tokens": stats["kept_tokens"],
                               "completion_tokens": stats["completion_tokens"],
                               "text_roundtrip_exact": stats["text_roundtrip_exact"]}
                    row["round"] = round_
                    row["warmup"] = round_ == 0
                    rows.append(row)
        finally:
            server.terminate()
            try:
                server.wait(timeout=30)
            except subprocess.TimeoutExpired:
                server.kill()

    environment["load_average_1min_at_end"] = round(os.getloadavg()[0], 2)
    timed = [row for row in rows if not row["warmup"]]
    full = [row for row in timed if row["path"] == "full"]
    spc = [row for row in timed if row["path"] == "specpc"]
    columns = {
        "full_request_seconds": [r["request_seconds"] for r in full],
        "specpc_compress_seconds": [r["compress_seconds"] for r in spc],
        "specpc_draft_seconds": [r["draft_seconds"] for r in spc],
        "specpc_request_seconds": [r["request_seconds"] for r in spc],
        "specpc_end_to_end_seconds": [r["compress_seconds"] + r["request_seconds"] for r in spc],
    }
    if args.stream:
        columns["full_first_chunk_seconds"] = [r["first_chunk_seconds"] for r in full]
        columns["specpc_first_chunk_seconds"] = [r["compress_seconds"] + r["first_chunk_seconds"] for r in spc]
    # Medians, and the fastest of each piece: the least disturbed by other work on a shared machine.
    summary = {statistic: {name: pick(values) for name, values in columns.items()}
               for statistic, pick in (("median", median), ("fastest", min))}
    fastest = summary["fastest"]  # the fastest of each piece: end-to-end = fastest compression + fastest request
    fastest["specpc_end_to_end_seconds"] = fastest["specpc_compress_seconds"] + fastest["specpc_request_seconds"]
    if args.stream:
        fastest["specpc_first_chunk_seconds"] = (fastest["specpc_compress_seconds"]
                                                 + min(r["first_chunk_seconds"] for r in spc))
    for numbers in summary.values():
        numbers["end_to_end_ratio"] = numbers["specpc_end_to_end_seconds"] / numbers["full_request_seconds"]
        if args.stream:
            numbers["first_chunk_ratio"] = numbers["specpc_first_chunk_seconds"] / numbers["full_first_chunk_seconds"]
    summary["full_prompt_tokens"] = sorted({r["prompt_tokens"] for r in full})
    summary["specpc_prompt_tokens"] = sorted({r["prompt_tokens"] for r in spc})
    summary["completion_tokens"] = sorted({r["completion_tokens"] for r in timed})

    print(f"# {environment}")
    print(f"# target 4 layers hidden 256 (served by `transformers serve`), draft 2 layers hidden 128; prompt "
          f"{args.length} tokens, SpecPC budget {args.budget}, lookahead {args.lookahead}, {args.max_tokens} new "
          f"tokens, {args.requests} timed requests per path, stream={args.stream}")
    print(f"# prompt tokens at the server: full {summary['full_prompt_tokens']}, SpecPC "
          f"{summary['specpc_prompt_tokens']}; completion tokens per answer: {summary['completion_tokens']}")
    print()
    header = ("| statistic | full: request s | SpecPC: compress s (draft) | SpecPC: request s | SpecPC: end-to-end s "
              "| end-to-end × full |")
    if args.stream:
        header += " full: first chunk s | SpecPC: compress + first chunk s | first chunk × full |"
    print(header)
    print("|---" * header.count(" |") + "|")
    for statistic in ("median", "fastest"):
        n = summary[statistic]
        line = (f"| {statistic if statistic == 'median' else 'fastest of each piece'} | {n['full_request_seconds']:.3f} | {n['specpc_compress_seconds']:.3f} "
                f"({n['specpc_draft_seconds']:.3f}) | {n['specpc_request_seconds']:.3f} | "
                f"{n['specpc_end_to_end_seconds']:.3f} | {n['end_to_end_ratio']:.2f} |")
        if args.stream:
            line += (f" {n['full_first_chunk_seconds']:.3f} | {n['specpc_first_chunk_seconds']:.3f} | "
                     f"{n['first_chunk_ratio']:.2f} |")
        print(line)
    print()
    n = summary["median"]
    print(f"median added by the front end per request: {n['specpc_compress_seconds']:.3f} s of compression; saved at "
          f"the server: {n['full_request_seconds'] - n['specpc_request_seconds']:.3f} s")
    if args.json:
        Path(args.json).write_text(json.dumps({"environment": environment, "args": vars(args), "summary": summary,
                                               "rows": rows}, indent=2))
    return summary, rows


if __name__ == "__main__":
    main()
