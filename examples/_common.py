"""Shared by the examples: tiny in-process models by default, any local checkpoint pair with --target/--draft."""

from __future__ import annotations

import argparse

import torch


def parser(description: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--target", help="local path of the target checkpoint (default: tiny random models)")
    parser.add_argument("--draft", help="local path of the draft checkpoint (same tokenizer as the target)")
    return parser


def load_models(args):
    """`(target, draft, tokenizer, long_prompt)`; the prompt is a text the tokenizer can read."""
    if not args.target:
        from hf_specapprox.testing import tiny_pair, tiny_tokenizer, words

        target, draft = tiny_pair()
        return target, draft, tiny_tokenizer(), words(400, seed=1)
    if not args.draft:
        raise SystemExit("--target needs --draft too")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(args.target, padding_side="left")
    target = AutoModelForCausalLM.from_pretrained(args.target, dtype=torch.float32).eval()
    draft = AutoModelForCausalLM.from_pretrained(args.draft, dtype=torch.float32).eval()
    facts = "The secret code is 7341. " + "The grass is green and the sky is blue. " * 150
    return target, draft, tokenizer, facts + "\nWhat is the secret code? Answer:"
