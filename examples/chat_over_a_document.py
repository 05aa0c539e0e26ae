"""Chat over one long document: prefill it once, then every question selects its own KV.

`cache.retain_context(target, document_ids)` keeps the document's full keys and values (the target's and the
draft's). Each `generate` call whose ids start with the document then previews the answer with the draft from the
draft's retained keys, scores the document and the new tokens with the target's retained ones, keeps its budget and
decodes on that small cache: the document is never prefilled again, and each question gets the KV it needs (a cache
that was only continued would answer every follow-up from the KV chosen for the first question).

    python examples/chat_over_a_document.py
    python examples/chat_over_a_document.py --target PATH --draft PATH

Two ways to ask: one cache through a whole conversation (each turn's ids: everything so far plus the new question),
and `copy.deepcopy(cache)` per independent question (the copies share the document).
"""

from __future__ import annotations

import copy

import torch

from hf_specapprox import SpecKVCache, bind
from _common import load_models, parser


def main(argv=None):
    args = parser(__doc__).parse_args(argv)
    target, draft, tokenizer, prompt = load_models(args)
    bind(target)
    document = prompt if not args.target else prompt.rsplit("\n", 1)[0] + "\n"
    questions = ([" w1 w2 w3", " w4 w5", " w6 w7 w8 w9"] if not args.target else
                 ["What is the secret code? Answer:", " And the colour of the grass? Answer:", " And the sky? Answer:"])
    document_ids = tokenizer(document, return_tensors="pt")["input_ids"]
    cache = SpecKVCache(draft=draft, max_capacity_prompt=64, window_size=8, lookahead_tokens=8)
    cache.retain_context(target, document_ids)
    print(f"document: {document_ids.shape[1]} tokens retained "
          f"({cache.context.nbytes() / 2**20:.1f} MiB of target and draft keys and values)")

    # Independent questions: a copy per question, all sharing the retained document.
    answers = []
    for question in questions:
        ids = torch.cat([document_ids, tokenizer(question, return_tensors="pt", add_special_tokens=False)["input_ids"]],
                        dim=1)
        out = target.generate(input_ids=ids, attention_mask=torch.ones_like(ids), past_key_values=copy.deepcopy(cache),
                              max_new_tokens=8, do_sample=False)
        answers.append(tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True))
        print(f"Q: {question.strip()!r} -> {answers[-1]!r}")

    # A conversation: one cache, each turn sends everything so far plus the new question.
    conversation = document_ids
    for question in questions:
        asked = tokenizer(question, return_tensors="pt", add_special_tokens=False)["input_ids"]
        conversation = torch.cat([conversation, asked], dim=1)
        conversation = target.generate(input_ids=conversation, attention_mask=torch.ones_like(conversation),
                                       past_key_values=cache, max_new_tokens=8, do_sample=False)
    print(f"after the conversation the retained context holds {cache.context.length} tokens "
          f"(the working cache holds {cache.cache_bytes() / 2**20:.2f} MiB)")
    return answers, conversation, cache


if __name__ == "__main__":
    main()
