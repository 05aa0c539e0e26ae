"""SpecKV-PC (paper §4): SpecPC first (coarse), then SpecKV (fine) on the compressed prompt, reusing SpecPC's draft
tokens as SpecKV's lookahead, so the draft runs once."""

from __future__ import annotations

import warnings
from dataclasses import replace

import torch

from .modeling.adapters import unwrap_adapters
from . import compat
from .config import SpecKVConfig, SpecPCConfig
from .modeling.draft import check_draft_compatible
from .modeling.distributed import computed_on_first_rank
from .kv.speckv import SpecKVCache
from .prompt.specpc import SpecPCOutput, SpecPCPreprocessor

#: The released SpecKV-PC configs: SpecPC to 2048 tokens with kernel 32, and 20 draft tokens (the paper's code got
#: them from transformers' implicit default; here the number is explicit).
DEFAULT_SPECPC = SpecPCConfig(max_capacity_prompt=2048, window_size=64, kernel_size=32, lookahead_tokens=20)
DEFAULT_SPECKV = SpecKVConfig(max_capacity_prompt=256, window_size=32, kernel_size=7)


class SpecKVPC:
    """SpecKV-PC: compresses the prompt with SpecPC, then its KV cache with SpecKV.

    Args:
        draft (`PreTrainedModel`): the draft model.
        specpc_config ([`SpecPCConfig`], *optional*): the first stage (default: 2048 tokens, kernel 32, 20 draft
            tokens, as the released configs).
        speckv_config ([`SpecKVConfig`], *optional*): the second stage (default: budget 256, window 32, kernel 7); its
            `lookahead_tokens` is ignored: SpecPC's draft tokens are the lookahead.

    Example:

    ```python
    >>> cascade = SpecKVPC(draft)
    >>> compressed, cache = cascade(inputs["input_ids"], inputs["attention_mask"], model=target)
    >>> out = target.generate(**compressed.model_inputs, past_key_values=cache, max_new_tokens=64)
    >>> compressed, out = cascade.compress_and_generate(target, inputs["input_ids"], inputs["attention_mask"])
    ```
    """

    def __init__(self, draft, specpc_config: SpecPCConfig | None = None, speckv_config: SpecKVConfig | None = None):
        self.draft = unwrap_adapters(draft, role="draft")
        self.specpc = SpecPCPreprocessor(draft, config=specpc_config or replace(DEFAULT_SPECPC))
        self.speckv_config = speckv_config or replace(DEFAULT_SPECKV)

    def __call__(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, model=None,
                 protected_mask=None) -> tuple[SpecPCOutput, SpecKVCache]:
        """Runs SpecPC and returns its output with a fresh [`SpecKVCache`] that will reuse its draft tokens.

        Args:
            model (`PreTrainedModel`, *optional*): the target, bound and checked against the draft if given.
        """
        if model is not None:
            check_draft_compatible(self.draft, model)
        # A tensor-parallel target: the first rank of its group compresses, the others receive the same prompt.
        compressed = computed_on_first_rank(
            model, lambda: self.specpc(input_ids, attention_mask, protected_mask=protected_mask), input_ids.device,
            inputs=tuple(tensor for tensor in (input_ids, attention_mask) if tensor is not None),
        )
        cache = SpecKVCache(
            config=self.speckv_config, model=model, lookahead_ids=compressed.draft_tokens,
            lookahead_valid=compressed.draft_tokens_valid,
        )
        return compressed, cache

    def compress_and_generate(self, model, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                              **generate_kwargs):
        """SpecPC, then `model.generate` on the compressed prompt with the SpecKV cache.

        Returns:
            `(compressed, output)`, in the order of [`__call__`]: the [`SpecPCOutput`] and `generate`'s output (its
            sequences start with the compressed prompt).
        """
        compressed, cache = self(input_ids, attention_mask, model=model)
        generate_kwargs[compat.cache_kwarg_name(model)] = cache
        return compressed, model.generate(**compressed.model_inputs, **generate_kwargs)

    def generate(self, model, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, **generate_kwargs):
        """Deprecated: returns `(output, compressed)`, the other order than [`__call__`]'s; use
        [`compress_and_generate`], which returns `(compressed, output)`."""
        warnings.warn("`SpecKVPC.generate` is replaced by `SpecKVPC.compress_and_generate`, which returns "
                      "`(compressed, output)` (the order of `SpecKVPC.__call__`); `generate` will be removed in the next "
                      "minor version.", FutureWarning, stacklevel=2)
        compressed, output = self.compress_and_generate(model, input_ids, attention_mask, **generate_kwargs)
        return output, compressed
