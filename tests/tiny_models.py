"""Tiny random-weight models built in-process from configs (no downloads)."""

from __future__ import annotations

import torch
import transformers

# The in-process tokenizer and the vocabulary constants are the library's own testing helpers.
from hf_specapprox.testing import BOS_ID, EOS_ID, PAD_ID, VOCAB, tiny_tokenizer, words  # noqa: F401

FAMILIES = ("llama", "qwen2", "qwen3", "mistral", "gemma3", "phi3")


def tiny_config(
    family: str = "llama",
    *,
    num_layers: int = 2,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    head_dim: int = 8,
    attn_implementation: str = "sdpa",
    sliding_window: int = 6,
    vocab_size: int = VOCAB,
):
    common = dict(
        vocab_size=vocab_size,
        hidden_size=num_heads * head_dim,
        intermediate_size=2 * num_heads * head_dim,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads,
        max_position_embeddings=512,
        pad_token_id=PAD_ID,
        bos_token_id=BOS_ID,
        eos_token_id=EOS_ID,
        tie_word_embeddings=False,
    )
    if family == "llama":
        config = transformers.LlamaConfig(**common)
    elif family == "qwen2":
        config = transformers.Qwen2Config(**common)
    elif family == "qwen3":
        config = transformers.Qwen3Config(head_dim=head_dim, **common)
    elif family == "mistral":
        config = transformers.MistralConfig(sliding_window=None, head_dim=head_dim, **common)
    elif family == "phi3":
        config = transformers.Phi3Config(sliding_window=None, **common)
    elif family == "gemma3":
        layer_types = ["sliding_attention" if (i + 1) % 2 else "full_attention" for i in range(num_layers)]
        if "full_attention" not in layer_types:
            layer_types[-1] = "full_attention"
        config = transformers.Gemma3TextConfig(
            head_dim=head_dim,
            sliding_window=sliding_window,
            layer_types=layer_types,
            query_pre_attn_scalar=head_dim,
            **common,
        )
    else:
        raise ValueError(family)
    config._attn_implementation = attn_implementation
    return config


def tiny_model(family: str = "llama", seed: int = 0, **kwargs):
    config = tiny_config(family, **kwargs)
    torch.manual_seed(seed)
    if family == "gemma3":
        model = transformers.Gemma3ForCausalLM(config)
    else:
        model = transformers.AutoModelForCausalLM.from_config(config)
    # Random init is tiny; widen the logits a little so greedy choices are not near-ties.
    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.dim() == 2:
                parameter.normal_(0.0, 0.3)
    return model.eval()


def random_batch(batch: int, length: int, paddings: list[int], seed: int = 0):
    """Left-padded random prompts that avoid the special ids."""
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (batch, length), generator=generator)
    mask = torch.ones(batch, length, dtype=torch.long)
    for row, pad in enumerate(paddings):
        ids[row, :pad] = PAD_ID
        mask[row, :pad] = 0
    return ids, mask

