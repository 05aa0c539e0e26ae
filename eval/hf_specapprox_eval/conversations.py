"""Many questions over one long context: RULER-style conversations, and the methods that answer them.

A conversation is a long context holding several facts (magic numbers, a birth town, a code word at random depths of
a haystack) and a list of questions, each about a different fact:

* `multi_turn`: one chat; every turn asks the next question after the previous turns and the model's own answers;
* `multi_request`: independent requests that share the context (a service where many users ask about one corpus).

Everything is built in token ids: the context's ids are a true prefix of every turn's and request's ids (rendered with
the tokenizer's chat template when it has one), as a cache that keeps a context needs. Methods (one cache policy each,
budget = KV pairs per layer and KV head):

* `full`: the target with a `DynamicCache`: continued across turns; for requests, the context's cache deep-copied per
  request (transformers' prompt-reuse recipe);
* `speckv_fresh`: a fresh `SpecKVCache` over every turn's / request's whole ids;
* `speckv_continued`: one `SpecKVCache` continued across turns (its KV chosen for the first question); for requests,
  SpecKV compresses the context alone once and each request continues a copy;
* `speckv_retained`: `SpecKVCache.retain_context` on the context: every turn / request selects its own KV from the
  retained full keys and values;
* `snapkv_context`, `knorm_context`, `streamingllm_context`: query-agnostic baselines, as kvpress's pipeline answers
  many questions: the context compressed alone once, then continued (turns) or copied (requests).
"""

from __future__ import annotations

import copy
import json
import random
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from transformers import DynamicCache
from transformers.utils.logging import tqdm

import hf_specapprox as hs
from hf_specapprox import compat

from .metrics import string_match_part
from .tasks import WORDS, _haystack_units, _key, _number

CONVERSATION_MODES = ("multi_turn", "multi_request")
CONVERSATION_METHODS = ("full", "speckv_fresh", "speckv_continued", "speckv_retained", "snapkv_context", "knorm_context",
           "streamingllm_context")
_MARKERS = ("\u2460DOC\u2460", "\u2461ANSWER\u2461", "\u2462NEXT\u2462")


@dataclass
class Question:
    """One question: its text (after the context or the previous turn), the answer prefix and the expected answer."""

    text: str
    answer_prefix: str
    answers: list


@dataclass
class Conversation:
    """A context and its questions (`mode` says how they are asked)."""

    mode: str
    index: int
    context_ids: torch.Tensor  # (1, n)
    questions: list
    pieces: dict = field(default_factory=dict)  # chat-template text between the parts


def chat_pieces(tokenizer) -> dict:
    """The chat template's text around a user turn and between turns: `before` (up to the first user content),
    `to_answer` (end of a user turn, start of the assistant's), `to_next` (end of the assistant's turn, start of the
    next user turn). Plain text for a tokenizer without a template."""
    if not getattr(tokenizer, "chat_template", None):
        return {"before": "", "to_answer": "\nAnswer: ", "to_next": "\n"}
    doc, answer, nxt = _MARKERS
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": doc}, {"role": "assistant", "content": answer}, {"role": "user", "content": nxt}],
        tokenize=False, add_generation_prompt=True,
    )
    before, rest = text.split(doc)
    to_answer, rest = rest.split(answer)
    to_next, rest = rest.split(nxt)
    return {"before": before, "to_answer": to_answer, "to_next": to_next, "end": rest}


def make_conversation(mode: str, index: int, tokenizer, context_tokens: int, *, questions: int, haystack: str = "noise",
                      seed: int = 0) -> Conversation:
    """Conversation `index` of `mode` (deterministic in its arguments): a haystack of about `context_tokens` tokens with
    one fact per question at random depths, and the questions in a random order."""
    if mode not in CONVERSATION_MODES:
        raise ValueError(f"Unknown conversation mode {mode!r}; choose from {CONVERSATION_MODES}.")
    rng = random.Random(f"{mode}/{index}/{seed}/{context_tokens}")
    facts = []
    for _ in range(questions):
        kind = rng.choice(["number", "town", "word"])
        if kind == "number":
            key, value = _key(rng), _number(rng)
            facts.append((f"One of the special magic numbers for {key} is: {value}.",
                          Question(f"What is the special magic number for {key} mentioned in the text?",
                                   f"The special magic number for {key} is", [value])))
        elif kind == "town":
            person = f"{rng.choice(WORDS).title()} {rng.choice(WORDS).title()}son"
            town = rng.choice(WORDS).title() + "ville"
            facts.append((f"{person} was born in the town of {town}.",
                          Question(f"In which town was {person} born?", "The town is", [town])))
        else:
            thing, word = rng.choice(WORDS), rng.choice(WORDS).upper()
            facts.append((f"The secret code word of the {thing} is {word}.",
                          Question(f"What is the secret code word of the {thing}?", "The code word is", [word])))
    pieces = chat_pieces(tokenizer)
    units = _haystack_units(haystack)
    count = lambda text: len(tokenizer(text, add_special_tokens=False)["input_ids"])
    per_unit = max(1, count("".join(units[:20])) // min(20, len(units)))
    reserve = 64 * questions + count(pieces["before"]) + 16
    body = []
    for number in range(max(1, (context_tokens - reserve) // per_unit)):
        body.append(units[number % len(units)].strip())
    depths = sorted(rng.randrange(len(body) + 1) for _ in facts)
    for offset, (depth, (fact, _)) in enumerate(zip(depths, facts)):
        body.insert(depth + offset, fact)
    document = "Read the following text and answer the questions about it.\n\n" + " ".join(body) + "\n\n"
    context_ids = tokenizer(pieces["before"] + document, return_tensors="pt", add_special_tokens=False)["input_ids"]
    asked = [question for _, question in facts]
    rng.shuffle(asked)
    return Conversation(mode, index, context_ids, asked, pieces)


def _ids(tokenizer, text: str) -> torch.Tensor:
    return tokenizer(text, return_tensors="pt", add_special_tokens=False)["input_ids"]


def question_ids(tokenizer, conversation: Conversation, question: Question) -> torch.Tensor:
    """What follows the context (or the previous answer) for `question`: its text, the end of the user turn, the
    start of the assistant's and the answer prefix."""
    return _ids(tokenizer, question.text + conversation.pieces["to_answer"] + question.answer_prefix)


def _strip_answer(answer: torch.Tensor, stop_ids: list[int]) -> torch.Tensor:
    """The answer's tokens up to (not including) its first stop token."""
    for position, token in enumerate(answer.tolist()):
        if token in stop_ids:
            return answer[:position]
    return answer


# ----------------------------------------------------------------------------------------------------------------------
# Methods: each returns a callable `ask(ids) -> (answer ids, numbers)` for one conversation
# ----------------------------------------------------------------------------------------------------------------------
def _kv_cache(name: str, draft, budget: int, lookahead: int):
    if name.startswith("speckv"):
        return hs.SpecKVCache(draft=draft, max_capacity_prompt=budget, window_size=min(32, budget - 1),
                              lookahead_tokens=lookahead, sparse_prefill="off")
    if name.startswith("snapkv"):
        return hs.SnapKVCache(max_capacity_prompt=budget, window_size=min(32, budget - 1))
    if name.startswith("knorm"):
        return hs.KnormCache(max_capacity_prompt=budget)
    return hs.StreamingLLMCache(max_capacity_prompt=budget)


def _cache_numbers(cache) -> dict:
    if isinstance(cache, DynamicCache):
        working = sum(layer.keys.numel() * layer.keys.element_size() * 2 for layer in cache.layers
                      if getattr(layer, "keys", None) is not None and layer.keys.dim() == 4)
        return {"working_bytes": working, "store_bytes": 0}
    context = getattr(cache, "context", None)
    return {"working_bytes": cache.cache_bytes(), "store_bytes": 0 if context is None else context.nbytes()}


class _Asker:
    """Answers the questions of one conversation with one method, keeping what the method keeps between them."""

    def __init__(self, method: str, mode: str, target, draft, context_ids, *, budget: int, max_new_tokens: int,
                 generate):
        self.method, self.mode, self.target, self.draft = method, mode, target, draft
        self.budget, self.max_new_tokens, self.generate = budget, max_new_tokens, generate
        self.shared = None  # what every request starts from (a cache holding the context), or the one chat cache
        self.setup_seconds = 0.0
        start = time.perf_counter()
        if method == "full":
            if mode == "multi_request":
                self.shared = DynamicCache()
                with torch.no_grad():
                    target(input_ids=context_ids, use_cache=True, **{compat.cache_kwarg_name(target): self.shared})
            else:
                self.shared = DynamicCache()
        elif method == "speckv_retained":
            self.shared = _kv_cache(method, draft, budget, max_new_tokens).retain_context(target, context_ids)
        elif method == "speckv_fresh":
            self.shared = None
        else:  # continued / query-agnostic: compress the context alone once (requests), or the first turn (turns)
            self.shared = _kv_cache(method, draft, budget, max_new_tokens)
            if mode == "multi_request" or method.endswith("_context"):
                self.shared.prepare_prefill(target, context_ids, {"attention_mask": torch.ones_like(context_ids)})
        self.setup_seconds = time.perf_counter() - start

    def ask(self, ids: torch.Tensor):
        if self.method == "speckv_fresh":
            cache = _kv_cache(self.method, self.draft, self.budget, self.max_new_tokens)
        elif self.mode == "multi_request":
            cache = copy.deepcopy(self.shared)
        else:
            cache = self.shared
        sequences = self.generate(self.target, ids, cache, self.max_new_tokens)
        return sequences[0, ids.shape[1]:], _cache_numbers(cache)


def greedy_generate(target, ids, cache, max_new_tokens):
    """The answers' decoding: greedy with the target's generation config (as the harness decodes)."""
    return target.generate(input_ids=ids, attention_mask=torch.ones_like(ids), **{compat.cache_kwarg_name(target): cache},
                           max_new_tokens=max_new_tokens, do_sample=False, temperature=None, top_p=None, top_k=None)


def run_conversation(conversation: Conversation, method: str, target, draft, tokenizer, *, budget: int,
                     max_new_tokens: int, generate=greedy_generate) -> list[dict]:
    """Every turn (or request) of one conversation with one method: one row each."""
    if method not in CONVERSATION_METHODS:
        raise ValueError(f"Unknown method {method!r}; choose from {CONVERSATION_METHODS}.")
    asker = _Asker(method, conversation.mode, target, draft, conversation.context_ids, budget=budget,
                   max_new_tokens=max_new_tokens, generate=generate)
    stop_ids = [tokenizer.eos_token_id] + ([tokenizer.pad_token_id] if tokenizer.pad_token_id is not None else [])
    eos = target.generation_config.eos_token_id
    stop_ids += eos if isinstance(eos, list) else [eos] if eos is not None else []
    rows, conversation_ids = [], conversation.context_ids
    for turn, question in enumerate(conversation.questions):
        asked = question_ids(tokenizer, conversation, question)
        if conversation.mode == "multi_request":
            ids = torch.cat([conversation.context_ids, asked], dim=1)
        elif turn == 0:
            ids = torch.cat([conversation_ids, asked], dim=1)
        else:
            ids = torch.cat([conversation_ids, _ids(tokenizer, conversation.pieces["to_next"]), asked], dim=1)
        start = time.perf_counter()
        answer, numbers = asker.ask(ids)
        seconds = time.perf_counter() - start
        answer = _strip_answer(answer, stop_ids)
        prediction = tokenizer.decode(answer, skip_special_tokens=True)
        rows.append(dict(mode=conversation.mode, index=conversation.index, method=method, budget=budget, turn=turn,
                         prompt_tokens=ids.shape[1], prediction=prediction, answers=question.answers,
                         score=string_match_part(prediction, question.answers), seconds=seconds,
                         setup_seconds=asker.setup_seconds if turn == 0 else 0.0, **numbers))
        if conversation.mode == "multi_turn":
            conversation_ids = torch.cat([ids, answer[None].to(ids.device)], dim=1)
    return rows


def run_conversations(target, draft, tokenizer, *, modes, methods, budget: int, context_lengths, num_samples: int,
                      out_path, turns: int = 3, requests: int = 4, max_new_tokens: int = 32, haystack: str = "noise",
                      seed: int = 0) -> list[dict]:
    """Every (mode, conversation, context length, method) not already in `out_path` (one JSON line per turn, written
    when the conversation is done): resumable."""
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    done = set()
    if out_path.exists():
        for line in out_path.read_text().splitlines():
            if line.strip():
                row = json.loads(line)
                done.add((row["mode"], row["index"], row["context_length"], row["method"], row["budget"]))
    jobs = [(length, mode, index, method) for length in context_lengths for index in range(num_samples)
            for mode in modes for method in methods
            if (mode, index, length, method, budget) not in done]
    conversations = {}
    with open(out_path, "a") as handle:
        for length, mode, index, method in tqdm(jobs, desc="conversations"):
            key = (length, mode, index)
            if key not in conversations:
                conversations[key] = make_conversation(mode, index, tokenizer, length,
                                                       questions=turns if mode == "multi_turn" else requests,
                                                       haystack=haystack, seed=seed)
            rows = run_conversation(conversations[key], method, target, draft, tokenizer, budget=budget,
                                    max_new_tokens=max_new_tokens)
            for row in rows:
                row["context_length"] = length
                row["context_tokens"] = conversations[key].context_ids.shape[1]
                handle.write(json.dumps(row) + "\n")
            handle.flush()
    rows = [json.loads(line) for line in out_path.read_text().splitlines() if line.strip()]
    return [row for row in rows if row["context_length"] in context_lengths and row["method"] in methods
            and row["mode"] in modes and row["budget"] == budget]


def summarize_conversations(rows: list[dict]) -> list[dict]:
    """Per (context length, mode, method): the first turn's and the follow-ups' mean score and seconds, the working
    cache and retained-context bytes, and how often the answer equals the full target's."""
    from collections import defaultdict

    full = {(row["context_length"], row["mode"], row["index"], row["turn"]): row["prediction"] for row in rows
            if row["method"] == "full"}
    groups = defaultdict(list)
    for row in rows:
        groups[(row["context_length"], row["mode"], row["method"])].append(row)
    mean = lambda values: sum(values) / len(values) if values else float("nan")
    table = []
    for (length, mode, method), items in sorted(groups.items()):
        first = [row for row in items if row["turn"] == 0]
        later = [row for row in items if row["turn"] > 0]
        same = [full.get((length, mode, row["index"], row["turn"])) == row["prediction"] for row in items
                if (length, mode, row["index"], row["turn"]) in full]
        table.append(dict(
            context_length=length, mode=mode, method=method, conversations=len(first), turns=len(items),
            first_score=mean([row["score"] for row in first]), first_seconds=mean([row["seconds"] for row in first]),
            followup_score=mean([row["score"] for row in later]),
            followup_seconds=mean([row["seconds"] for row in later]),
            setup_seconds=mean([row["setup_seconds"] for row in first]),
            working_mib=mean([row["working_bytes"] for row in items]) / 2**20,
            store_mib=max(row["store_bytes"] for row in items) / 2**20,
            same_as_full=f"{sum(same)}/{len(same)}" if same else "—",
        ))
    return table


def conversation_table(summary: list[dict]) -> str:
    """A markdown table of [`summarize_conversations`], with follow-up time ratios against `full` and `speckv_fresh`
    of the same length and mode."""
    by = {(row["context_length"], row["mode"], row["method"]): row for row in summary}
    lines = ["| context | mode | method | first-turn score | follow-up score | = full's answer | first-turn s | "
             "follow-up s | vs full | vs SpecKV fresh | setup s | working MiB | retained MiB |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    ratio = lambda row, other: (row["followup_seconds"] / other["followup_seconds"]) if other else float("nan")
    for row in summary:
        key = (row["context_length"], row["mode"])
        lines.append(
            f"| {row['context_length']} | {row['mode']} | {row['method']} | {row['first_score']:.1f} | "
            f"{row['followup_score']:.1f} | {row['same_as_full']} | {row['first_seconds']:.1f} | "
            f"{row['followup_seconds']:.1f} | {ratio(row, by.get(key + ('full',))):.2f} | "
            f"{ratio(row, by.get(key + ('speckv_fresh',))):.2f} | {row['setup_seconds']:.1f} | "
            f"{row['working_mib']:.1f} | {row['store_mib']:.1f} |"
        )
    return "\n".join(lines)


__all__ = ["Conversation", "Question", "chat_pieces", "make_conversation", "run_conversation",
           "run_conversations",
           "summarize_conversations", "conversation_table", "CONVERSATION_METHODS", "CONVERSATION_MODES"]
