"""An int8 weight-only draft (torchao through transformers) against the fp32 draft, on the study's prompts.

For each prompt, with each draft:

* the SpecKV preview (the draft's greedy answer, as many tokens as the task's answer budget): how many of the int8
  draft's tokens equal the fp32 draft's before the first difference, and the fraction of equal positions;
* the SpecPC selection at `--pc-budget`: the overlap (|A ∩ B| / |A|) of the kept token sets;
* SpecPC's accuracy: the target answers from each compressed prompt (greedy), scored with RULER's metric;
* the draft's seconds for SpecPC's pass.

    python benchmarks/quantized_draft.py --samples 2 --out benchmarks/results/int8-draft-2k

Rows go to `<out>/results.jsonl` (a rerun continues); a summary table is printed at the end.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tasks", nargs="+", default=["niah_single", "niah_multikey", "vt", "qa"])
    parser.add_argument("--samples", type=int, default=2)
    parser.add_argument("--length", type=int, default=2048)
    parser.add_argument("--pc-budget", type=int, default=512)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default="benchmarks/results/int8-draft-2k")
    args = parser.parse_args()

    from torchao.quantization import Int8WeightOnlyConfig
    from transformers import AutoModelForCausalLM, TorchAoConfig

    from hf_specapprox import SpecPCPreprocessor
    from hf_specapprox.modeling.draft import generate_lookahead
    from hf_specapprox_eval import make_samples, score
    from hf_specapprox_eval.methods import _greedy
    from hf_specapprox_eval.models import load_pair

    torch.set_num_threads(args.threads)
    target, draft, tokenizer = load_pair()
    with tempfile.TemporaryDirectory() as folder:
        draft.save_pretrained(folder)
        int8_draft = AutoModelForCausalLM.from_pretrained(
            folder, quantization_config=TorchAoConfig(Int8WeightOnlyConfig())).eval()
    drafts = {"fp32": draft, "int8": int8_draft}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "results.jsonl"
    done = {(r["task"], r["index"]) for r in map(json.loads, path.read_text().splitlines())} if path.exists() else set()
    layer = min(8, draft.config.num_hidden_layers - 1)
    with open(path, "a") as handle, torch.no_grad():
        for model in drafts.values():  # first-call costs stay out of the timings
            model(input_ids=torch.tensor([[tokenizer.eos_token_id] * 16]))
        for sample in make_samples(args.tasks, tokenizer, args.length, args.samples):
            if (sample.task, sample.index) in done:
                continue
            encoded = tokenizer(sample.prompt, return_tensors="pt", add_special_tokens=False)
            ids, mask = encoded["input_ids"], encoded["attention_mask"]
            result = dict(task=sample.task, index=sample.index, prompt_tokens=ids.shape[1], pc_budget=args.pc_budget)
            previews, kept = {}, {}
            for name, model in drafts.items():
                preview, valid = generate_lookahead(model, ids, mask, sample.max_new_tokens)
                previews[name] = preview[0][valid[0]]  # up to and including the draft's EOS
                specpc = SpecPCPreprocessor(model, max_capacity_prompt=args.pc_budget,
                                            window_size=min(64, args.pc_budget), starting_layer_index=layer)
                start = time.perf_counter()
                compressed = specpc(ids, mask)
                result[f"{name}_draft_seconds"] = time.perf_counter() - start
                kept[name] = set(compressed.kept_indices[0].tolist())
                sequences = _greedy(target, compressed.model_inputs["input_ids"],
                                    compressed.model_inputs["attention_mask"], sample.max_new_tokens)
                answer = tokenizer.decode(sequences[0, compressed.model_inputs["input_ids"].shape[1]:],
                                          skip_special_tokens=True)
                result[f"{name}_specpc_score"] = score(answer, sample.answers, sample.metric)
            a, b = previews["fp32"], previews["int8"]
            common = min(len(a), len(b))
            equal = (a[:common] == b[:common]).tolist()
            result["preview_matched_prefix"] = next((i for i, same in enumerate(equal) if not same), common)
            result["preview_equal_fraction"] = sum(equal) / max(len(a), len(b), 1)
            result["specpc_kept_overlap"] = len(kept["fp32"] & kept["int8"]) / max(len(kept["fp32"]), 1)
            handle.write(json.dumps(result) + "\n")
            handle.flush()
            print(json.dumps(result))
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    mean = lambda key: sum(r[key] for r in rows) / len(rows)  # noqa: E731
    print(f"| prompts | preview equal | preview matched prefix | SpecPC kept overlap | SpecPC score fp32 | int8 | "
          f"draft s fp32 | int8 |\n|---|---|---|---|---|---|---|---|\n| {len(rows)} | "
          f"{mean('preview_equal_fraction'):.2f} | {mean('preview_matched_prefix'):.1f} | "
          f"{mean('specpc_kept_overlap'):.3f} | {mean('fp32_specpc_score'):.1f} | {mean('int8_specpc_score'):.1f} | "
          f"{mean('fp32_draft_seconds'):.1f} | {mean('int8_draft_seconds'):.1f} |")


if __name__ == "__main__":
    main()
