"""RULER's metrics (case-insensitive substring match, ×100) and a LongBench-format JSONL loader."""

from __future__ import annotations

import json


def string_match_all(prediction: str, answers: list[str]) -> float:
    """Share of the answers found in the prediction, ×100 (RULER's `string_match_all`)."""
    text = prediction.lower()
    return 100.0 * sum(answer.lower() in text for answer in answers) / max(len(answers), 1)


def string_match_part(prediction: str, answers: list[str]) -> float:
    """100 if any answer is found in the prediction (RULER's `string_match_part`)."""
    text = prediction.lower()
    return 100.0 * float(any(answer.lower() in text for answer in answers))


METRICS = {"all": string_match_all, "part": string_match_part}


def score(prediction: str, answers: list[str], metric: str) -> float:
    return METRICS[metric](prediction, answers)


def load_longbench_jsonl(path: str, tokenizer, template: str | None = None, max_new_tokens: int = 64,
                         limit: int | None = None):
    """Reads a LongBench-format JSONL file (`context`, `input`, `answers`) into samples scored by substring match.

    Args:
        template (`str`, *optional*): format string with `{context}` and `{input}`; defaults to a plain
            "context, then question, then Answer:" prompt, wrapped in the tokenizer's chat template when it has one.
    """
    from .tasks import Sample

    template = template or "{context}\n\nQuestion: {input}"
    samples = []
    with open(path) as handle:
        for index, line in enumerate(handle):
            if limit is not None and index >= limit:
                break
            record = json.loads(line)
            user = template.format(context=record["context"], input=record["input"])
            if getattr(tokenizer, "chat_template", None):
                prompt = tokenizer.apply_chat_template([{"role": "user", "content": user}], tokenize=False,
                                                       add_generation_prompt=True) + "Answer:"
            else:
                prompt = user + "\nAnswer:"
            samples.append(Sample(record.get("dataset", "longbench"), index, prompt, list(record["answers"]), "part",
                                  max_new_tokens))
    return samples
