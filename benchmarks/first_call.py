"""The first call in a new process: what compiling the sparse prefill's FlexAttention costs, cold and warm.

    python benchmarks/first_call.py --json benchmarks/results/first_call_cpu.json

Runs `--processes` fresh Python processes one after another, all with one inductor cache folder
(`TORCHINDUCTOR_CACHE_DIR`, a new empty one for the first process): the first process compiles from nothing (a cold
machine), the later ones find torch's persistent caches (FX graph and AOTAutograd) warm, as every process after the
first does on a machine that keeps that folder. In each process a random-weight Llama (the long-context study's smoke
shape) runs SpecKV with the sparse prefill on, at two prompt lengths (the kernel compiles for the first length, then
once more with dynamic lengths for the second); each length's first `generate` call is timed, then a second call. The
compile cost of a length is its first call minus its second. Medians are not taken: each process is one sample.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

WORKER = r"""
import json, sys, time
import torch
from transformers import LlamaConfig, LlamaForCausalLM
import hf_specapprox as hs

lengths = [int(n) for n in sys.argv[1].split(",")]
torch.set_num_threads(int(sys.argv[2]))
def build(layers, hidden, heads, kv_heads, seed):
    config = LlamaConfig(num_hidden_layers=layers, hidden_size=hidden, num_attention_heads=heads,
                         num_key_value_heads=kv_heads, head_dim=32, intermediate_size=2 * hidden, vocab_size=512,
                         max_position_embeddings=max(lengths) + 64)
    config._attn_implementation = "sdpa"
    torch.manual_seed(seed)
    return LlamaForCausalLM(config).eval()
target, draft = hs.bind(build(2, 128, 4, 4, 0)), build(1, 64, 2, 2, 1)
knobs = dict(max_capacity_prompt=128, window_size=32, lookahead_tokens=4, sparse_prefill="on",
             prefill_vertical_size=256, prefill_window_size=256, prefill_block_size=64)
rows = []
for length in lengths:
    ids = torch.randint(3, 512, (1, length), generator=torch.Generator().manual_seed(length))
    times = []
    for _ in range(2):
        start = time.perf_counter()
        target.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=4, min_new_tokens=4,
                        do_sample=False, pad_token_id=0, past_key_values=hs.SpecKVCache(draft=draft, **knobs))
        times.append(time.perf_counter() - start)
    rows.append(dict(length=length, first_s=times[0], second_s=times[1], compile_s=times[0] - times[1]))
print(json.dumps(rows))
"""


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--processes", type=int, default=3)
    parser.add_argument("--lengths", default="1024,2048")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json")
    args = parser.parse_args(argv)
    import torch
    import transformers

    results = []
    with tempfile.TemporaryDirectory() as cache:
        env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": cache, "HF_HUB_OFFLINE": "1",
               "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
        for number in range(args.processes):
            done = subprocess.run([sys.executable, "-c", WORKER, args.lengths, str(args.threads)], env=env,
                                  capture_output=True, text=True, timeout=1800)
            if done.returncode:
                raise SystemExit(done.stderr[-3000:])
            rows = json.loads(done.stdout.strip().splitlines()[-1])
            results.append(dict(process=number + 1, cache="cold" if number == 0 else "warm", rows=rows))
            print(f"process {number + 1} ({results[-1]['cache']} cache): " + ", ".join(
                f"{row['length']} tokens: first call {row['first_s']:.1f} s, second {row['second_s']:.2f} s, "
                f"compile {row['compile_s']:.1f} s" for row in rows), flush=True)
    total = [sum(row["compile_s"] for row in result["rows"]) for result in results]
    print(f"compile per process (all lengths): cold {total[0]:.1f} s; warm " +
          ", ".join(f"{value:.1f} s" for value in total[1:]))
    if args.json:
        Path(args.json).write_text(json.dumps(dict(
            date=str(datetime.date.today()), machine=platform.processor() or platform.machine(),
            cpus=os.cpu_count(), torch=torch.__version__, transformers=transformers.__version__,
            threads=args.threads, lengths=args.lengths, processes=results, compile_per_process_s=total), indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
