"""Tiny random-weight models and an in-process tokenizer for examples, docs and quick experiments (no downloads).

The models answer nonsense; they exist so that every code path can be run in seconds on a CPU.
"""

from __future__ import annotations

import torch
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

VOCAB = 97
PAD_ID, BOS_ID, EOS_ID = 0, 1, 2

CHAT_TEMPLATE = (
    "{% for message in messages %}<s> {{ message['role'] }} : {{ message['content'] }} </s> {% endfor %}"
    "{% if add_generation_prompt %}<s> assistant : {% endif %}"
)


def tiny_pair(seed: int = 0, draft_layers: int = 2):
    """A `(target, draft)` pair sharing the 97-token vocabulary of [`tiny_tokenizer`]: a 2-layer Qwen2 target with
    GQA and a Llama draft (2 layers; 10 or more let SpecPC's default voting layers, 8 on, exist)."""
    common = dict(vocab_size=VOCAB, pad_token_id=PAD_ID, bos_token_id=BOS_ID, eos_token_id=EOS_ID,
                  max_position_embeddings=4096, tie_word_embeddings=False)
    torch.manual_seed(seed)
    target = Qwen2ForCausalLM(Qwen2Config(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                          num_attention_heads=4, num_key_value_heads=2, **common))
    draft = LlamaForCausalLM(LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=draft_layers,
                                         num_attention_heads=4, num_key_value_heads=2, **common))
    return target.eval(), draft.eval()


def tiny_tokenizer() -> PreTrainedTokenizerFast:
    """A whitespace word-level tokenizer: ids 0-2 are `<pad>`, `<s>`, `</s>`; `w3` … `w93` are words; then `user`,
    `assistant` and `:` for its chat template. Pads on the left."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    vocab = {"<pad>": PAD_ID, "<s>": BOS_ID, "</s>": EOS_ID}
    vocab.update({f"w{i}": i for i in range(3, VOCAB - 3)})
    vocab.update({"user": VOCAB - 3, "assistant": VOCAB - 2, ":": VOCAB - 1})
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<pad>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    backend.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", bos_token="<s>",
                                        eos_token="</s>", padding_side="left",
                                        model_input_names=["input_ids", "attention_mask"])
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def words(count: int, seed: int = 0) -> str:
    """`count` random words of [`tiny_tokenizer`]'s vocabulary, as one string."""
    generator = torch.Generator().manual_seed(seed)
    return " ".join(f"w{i}" for i in torch.randint(3, VOCAB - 3, (count,), generator=generator).tolist())
