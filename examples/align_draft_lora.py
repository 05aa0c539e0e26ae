"""LoRA-align a draft to its target: distil the target's greedy answers into the draft, measure the agreement.

SpecKV and SpecPC work as well as the draft guesses where the target's answer will look. This script

1. builds training and held-out prompts with the evaluation tasks (`hf_specapprox_eval.make_sample`),
2. has the target answer each one greedily (`--answer-tokens`),
3. measures the draft's agreement with those answers on the held-out prompts: teacher-forced top-1 agreement (the
   draft's next-token choice given the target's answer so far) and the free-running agreement (the draft's own greedy
   answer, position by position),
4. trains a LoRA adapter on the draft (cross-entropy on the target's answer tokens only, AdamW),
5. measures again, and saves the adapter with `--save`.

    python examples/align_draft_lora.py                       # tiny random models, seconds
    python examples/align_draft_lora.py --embedded --train 32 --heldout 16 --length 512 --steps 64
    python examples/align_draft_lora.py --target PATH --draft PATH --save draft-lora

Needs `peft`. The draft you pass is not modified: the adapter goes on a copy.
"""

from __future__ import annotations

import copy
import random

import torch

from hf_specapprox.modeling.draft import generate_lookahead
from hf_specapprox_eval import make_sample
from _common import load_models, parser

TASKS = ["niah_single", "niah_multikey", "vt", "qa"]


def _prompts(tokenizer, indices, length):
    return [make_sample(TASKS[i % len(TASKS)], i, tokenizer, length).prompt for i in indices]


@torch.no_grad()
def _target_answers(target, tokenizer, prompts, answer_tokens):
    answers = []
    for prompt in prompts:
        ids = tokenizer(prompt, return_tensors="pt", add_special_tokens=False)["input_ids"]
        out = target.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=answer_tokens,
                              do_sample=False, pad_token_id=tokenizer.pad_token_id or 0)
        answers.append((ids, out[:, ids.shape[1]:]))
    return answers


@torch.no_grad()
def agreement(draft, answers) -> dict:
    """Teacher-forced and free-running agreement of `draft` with the target's answers, in [0, 1]."""
    forced = free = total = 0
    for ids, answer in answers:
        sequence = torch.cat([ids, answer], dim=1)
        logits = draft(input_ids=sequence).logits[:, ids.shape[1] - 1 : -1]
        forced += (logits.argmax(-1) == answer).sum().item()
        preview, _ = generate_lookahead(draft, ids, torch.ones_like(ids), answer.shape[1])
        length = min(preview.shape[1], answer.shape[1])
        free += (preview[:, :length] == answer[:, :length]).sum().item()
        total += answer.shape[1]
    return {"teacher_forced": forced / total, "free_running": free / total}


def train_lora(draft, answers, *, steps, lr, rank, seed=0):
    """A LoRA-adapted copy of `draft` trained on `(prompt ids, target answer ids)` pairs; returns it and the losses."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    student = get_peft_model(copy.deepcopy(draft), LoraConfig(r=rank, lora_alpha=2 * rank, lora_dropout=0.0,
                                                               target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]))
    student.train()
    optimizer = torch.optim.AdamW([p for p in student.parameters() if p.requires_grad], lr=lr)
    order = list(range(len(answers)))
    random.Random(seed).shuffle(order)
    losses = []
    for step in range(steps):
        ids, answer = answers[order[step % len(order)]]
        sequence = torch.cat([ids, answer], dim=1)
        labels = sequence.clone()
        labels[:, : ids.shape[1]] = -100  # learn the answer only
        loss = student(input_ids=sequence, labels=labels).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    return student.eval(), losses


def main(argv=None):
    cli = parser(__doc__)
    cli.add_argument("--embedded", action="store_true", help="the embedded Qwen2.5-Coder pair (hf_specapprox_eval.models)")
    cli.add_argument("--train", type=int, default=8, help="training prompts")
    cli.add_argument("--heldout", type=int, default=4, help="held-out prompts for the agreement")
    cli.add_argument("--length", type=int, default=300, help="prompt length in tokens")
    cli.add_argument("--answer-tokens", type=int, default=16)
    cli.add_argument("--steps", type=int, default=40)
    cli.add_argument("--lr", type=float, default=1e-3)
    cli.add_argument("--rank", type=int, default=8)
    cli.add_argument("--save", help="folder for the trained adapter")
    args = cli.parse_args(argv)
    if args.embedded:
        from hf_specapprox_eval.models import load_pair

        target, draft, tokenizer = load_pair()
    else:
        target, draft, tokenizer, _ = load_models(args)
    train = _target_answers(target, tokenizer, _prompts(tokenizer, range(1000, 1000 + args.train), args.length),
                            args.answer_tokens)
    heldout = _target_answers(target, tokenizer, _prompts(tokenizer, range(args.heldout), args.length),
                              args.answer_tokens)
    before = {"train": agreement(draft, train), "heldout": agreement(draft, heldout)}
    student, losses = train_lora(draft, train, steps=args.steps, lr=args.lr, rank=args.rank)
    after = {"train": agreement(student, train), "heldout": agreement(student, heldout)}
    print(f"loss: {losses[0]:.3f} (first step) -> {sum(losses[-5:]) / len(losses[-5:]):.3f} (mean of the last 5)")
    print("| prompts | agreement | before | after |\n|---|---|---|---|")
    for split in ("train", "heldout"):
        for kind in ("teacher_forced", "free_running"):
            print(f"| {split} | {kind} | {before[split][kind]:.3f} | {after[split][kind]:.3f} |")
    if args.save:
        student.save_pretrained(args.save)
        print(f"adapter saved to {args.save}")
    return before, after, losses, student


if __name__ == "__main__":
    main()
