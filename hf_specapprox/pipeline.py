"""A text-generation pipeline that runs SpecKV, SpecPC or SpecKV-PC for every request."""

from __future__ import annotations

from dataclasses import replace

from transformers import AutoModelForCausalLM, LogitsProcessorList, TextGenerationPipeline
from transformers.pipelines import PIPELINE_REGISTRY

from . import compat
from .cascade import DEFAULT_SPECKV, DEFAULT_SPECPC
from .config import SpecKVConfig, SpecPCConfig
from .draft import check_draft_compatible
from .monitor import DraftAgreementMonitor
from .speckv import SpecKVCache
from .specpc import SpecPCPreprocessor

METHODS = ("speckv", "specpc", "speckv-pc")
TASK = "speckv-text-generation"
STATS_KEY = "hf_specapprox"


class SpecApproxTextGenerationPipeline(TextGenerationPipeline):
    """`TextGenerationPipeline` with draft-based approximate inference.

    Everything of the stock pipeline works (text and chat inputs, `batch_size`, `return_full_text`, generation
    kwargs); in addition each request gets, in `_forward`:

    * `method="speckv"` (default): a fresh [`SpecKVCache`] for `generate`;
    * `method="specpc"`: its prompt compressed by [`SpecPCPreprocessor`] before `generate`;
    * `method="speckv-pc"`: both, SpecKV reusing SpecPC's draft tokens.

    Each output carries the compression numbers under the `"hf_specapprox"` key (prompt tokens, kept tokens,
    ratio, draft seconds, and the draft/target agreement of every returned sequence). With `return_full_text=True`
    the text starts with the user's original prompt, not the compressed one.

    Args:
        draft_model (`PreTrainedModel`): the draft (same tokenizer as the target). Not `assistant_model`, which
            would switch on speculative decoding.
        method (`str`, *optional*, defaults to `"speckv"`): one of `"speckv"`, `"specpc"`, `"speckv-pc"`.
        speckv_config ([`SpecKVConfig`], *optional*), specpc_config ([`SpecPCConfig`], *optional*): the knobs.

    Example:

    ```python
    >>> from transformers import pipeline
    >>> import hf_specapprox
    >>> pipe = pipeline("speckv-text-generation", model=target, tokenizer=tokenizer, draft_model=draft,
    ...                 speckv_config=hf_specapprox.SpecKVConfig(max_capacity_prompt=256))
    >>> pipe(long_prompt, max_new_tokens=32)[0]["hf_specapprox"]
    ```
    """

    def __init__(self, *args, draft_model=None, method: str = "speckv", speckv_config: SpecKVConfig | None = None,
                 specpc_config: SpecPCConfig | None = None, **kwargs):
        if kwargs.get("assistant_model") is not None:
            raise ValueError(
                "`assistant_model` switches on speculative decoding. Pass the draft as `draft_model=` to use it for "
                "draft-based approximate inference."
            )
        if draft_model is None:
            raise ValueError("SpecApproxTextGenerationPipeline needs `draft_model=` (a small model of the same family).")
        if method not in METHODS:
            raise ValueError(f"`method` must be one of {METHODS}, got {method!r}.")
        super().__init__(*args, **kwargs)
        check_draft_compatible(draft_model, self.model)
        self.draft_model = draft_model
        self.method = method
        self.speckv_config = speckv_config or replace(DEFAULT_SPECKV)
        self.specpc = None
        if method != "speckv":  # SpecPC alone defaults to the paper's SpecPC knobs, the cascade to SpecKV-PC's
            default = SpecPCConfig() if method == "specpc" else replace(DEFAULT_SPECPC)
            self.specpc = SpecPCPreprocessor(draft_model, config=specpc_config or default)

    def _forward(self, model_inputs, **generate_kwargs):
        input_ids, attention_mask = model_inputs["input_ids"], model_inputs.get("attention_mask")
        batch = input_ids.shape[0]
        stats = [dict(prompt_tokens=int(n)) for n in (attention_mask.sum(-1) if attention_mask is not None
                                                       else [input_ids.shape[1]] * batch)]
        draft_tokens = draft_valid = None
        if self.specpc is not None:
            compressed = self.specpc(input_ids, attention_mask)
            model_inputs = dict(model_inputs, input_ids=compressed.input_ids, attention_mask=compressed.attention_mask)
            draft_tokens, draft_valid = compressed.draft_tokens, compressed.draft_tokens_valid
            for row, item in enumerate(stats):
                item.update(specpc_kept_tokens=int(compressed.kept_lengths[row]), draft_seconds=compressed.draft_seconds)
        cache = None
        if self.method in ("speckv", "speckv-pc"):
            cache = SpecKVCache(draft=self.draft_model, config=self.speckv_config, model=self.model,
                                lookahead_ids=draft_tokens, lookahead_valid=draft_valid)
            generate_kwargs[compat.cache_kwarg_name(self.model)] = cache
        monitor = DraftAgreementMonitor(cache if cache is not None else draft_tokens, draft_valid)
        processors = LogitsProcessorList(generate_kwargs.pop("logits_processor", None) or [])
        processors.append(monitor)
        outputs = super()._forward(model_inputs, logits_processor=processors, **generate_kwargs)

        sequences = outputs["generated_sequence"]  # (batch, num_return_sequences, length)
        flat = sequences.reshape(-1, sequences.shape[-1])
        compressed_kv = cache is not None and cache.is_compressed
        agreement = monitor.agreement(flat).reshape(batch, -1) if (compressed_kv or cache is None) else None
        for row, item in enumerate(stats):
            if cache is not None:
                item["kv_kept_per_layer"] = self.speckv_config.max_capacity_prompt if compressed_kv else None
            item["draft_agreement"] = None if agreement is None else agreement[row].tolist()
        outputs[STATS_KEY] = stats
        return outputs

    def postprocess(self, model_outputs, *args, **kwargs):
        stats = model_outputs.pop(STATS_KEY, None)
        records = super().postprocess(model_outputs, *args, **kwargs)
        if isinstance(stats, list):
            stats = stats[0]
        for index, record in enumerate(records):
            item = dict(stats or {})
            if item.get("draft_agreement") is not None:
                item["draft_agreement"] = item["draft_agreement"][index]
            record[STATS_KEY] = item
        return records


PIPELINE_REGISTRY.register_pipeline(
    TASK, pipeline_class=SpecApproxTextGenerationPipeline, pt_model=AutoModelForCausalLM, type="text"
)
