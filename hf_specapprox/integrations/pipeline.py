"""A text-generation pipeline that runs SpecKV, SpecPC or SpecKV-PC for every request."""

from __future__ import annotations

import copy

import torch
from transformers import AutoModelForCausalLM, DynamicCache, LogitsProcessorList, TextGenerationPipeline
from transformers.pipelines import PIPELINE_REGISTRY

from .. import compat
from ..kv.cache import KVCompressionCache

from ..modeling.draft import check_draft_compatible
from .monitor import DraftAgreementMonitor
from .registry import METHODS as REGISTRY
from .registry import get_method

TASK = "speckv-text-generation"
STATS_KEY = "hf_specapprox"
#: The config arguments the pipeline takes, at construction or per call: those of every registered method.
CONFIG_ARGUMENTS = tuple(dict.fromkeys(argument for spec in REGISTRY.values() for argument in spec.config_arguments))


class SpecApproxTextGenerationPipeline(TextGenerationPipeline):
    """`TextGenerationPipeline` with draft-based approximate inference.

    Everything of the stock pipeline works (text and chat inputs, `batch_size`, `return_full_text`, generation
    kwargs); in addition each request is prepared in `_forward` by the method of the registry
    (`hf_specapprox.integrations.registry`) named by `method`:

    * `method="speckv"` (default): a fresh [`SpecKVCache`] for `generate`;
    * `method="specpc"`: its prompt compressed by [`SpecPCPreprocessor`] before `generate`;
    * `method="speckv-pc"` (or `"speckv_pc"`): both, SpecKV reusing SpecPC's draft tokens ([`SpecKVPC`]);
    * the baselines `"snapkv"`, `"streamingllm"`, `"specprefill"` and `"full"` (no compression).

    `method` and the configs can be given at construction (defaults for every call) or per call:
    `pipe(prompt, method="specpc", specpc_config=SpecPCConfig(max_capacity_prompt=512))`.

    Each output carries the compression numbers under the `"hf_specapprox"` key: `prompt_tokens` (real tokens of
    the row), `specpc_kept_tokens` and `draft_seconds` (prompt compression), `kv_kept_per_layer` (KV compression: the
    real prompt positions each full-attention layer and KV head kept for this row, averaged over the layers under
    layer-wise budgets, counted as `max_capacity_prompt` counts them, i.e. without the last prompt token, which is always kept; `None` when the batch's prompt fitted the
    budget and nothing was dropped) and `draft_agreement` (of this returned sequence with the draft's tokens). With
    `return_full_text=True` the text starts with the user's original prompt, not the compressed one.

    Args:
        draft_model (`PreTrainedModel`): the draft (same tokenizer as the target). Not `assistant_model`, which
            would switch on speculative decoding. Needed by every method but the draft-free baselines.
        method (`str`, *optional*, defaults to `"speckv"`): a registered method name.
        **kwargs:
            the knobs, as the config arguments of the registered methods (`speckv_config` ([`SpecKVConfig`]),
            `specpc_config` ([`SpecPCConfig`]), `snapkv_config` ([`SnapKVConfig`]), `streamingllm_config`
            ([`StreamingLLMConfig`]), all optional); each method reads the ones it needs (SpecKV-PC both
            `specpc_config` and `speckv_config`).

    Example:

    ```python
    >>> from transformers import pipeline
    >>> import hf_specapprox
    >>> pipe = pipeline("speckv-text-generation", model=target, tokenizer=tokenizer, draft_model=draft,
    ...                 speckv_config=hf_specapprox.SpecKVConfig(max_capacity_prompt=256))
    >>> pipe(long_prompt, max_new_tokens=32)[0]["hf_specapprox"]
    >>> pipe(long_prompt, max_new_tokens=32, method="specpc")[0]["hf_specapprox"]
    ```
    """

    def __init__(self, *args, draft_model=None, method: str = "speckv", **kwargs):
        if kwargs.get("assistant_model") is not None:
            raise ValueError(
                "`assistant_model` switches on speculative decoding. Pass the draft as `draft_model=` to use it for "
                "draft-based approximate inference."
            )
        spec = get_method(method)
        if draft_model is None and spec.uses_draft:
            raise ValueError("SpecApproxTextGenerationPipeline needs `draft_model=` (a small model of the same family).")
        # `method` and the configs become defaults of every call through `_sanitize_parameters`.
        super().__init__(*args, method=spec.name, **kwargs)
        if draft_model is not None:
            check_draft_compatible(draft_model, self.model)
        self.draft_model = draft_model

    def _sanitize_parameters(self, method=None, cache=None, past_key_values=None, **kwargs):
        if kwargs.get("assistant_model") is not None:
            raise ValueError(
                "`assistant_model` switches on speculative decoding. Pass the draft as `draft_model=` when building "
                "the pipeline to use it for draft-based approximate inference."
            )
        if cache is not None and past_key_values is not None:
            raise ValueError("Pass the cache as `cache=` or `past_key_values=`, not both.")
        configs = {name: kwargs.pop(name) for name in CONFIG_ARGUMENTS if kwargs.get(name) is not None}
        for name in CONFIG_ARGUMENTS:
            kwargs.pop(name, None)
        preprocess_params, forward_params, postprocess_params = super()._sanitize_parameters(**kwargs)
        if method is not None:
            forward_params["method"] = get_method(method).name
        user_cache = cache if cache is not None else past_key_values
        if user_cache is not None:
            forward_params["user_cache"] = user_cache
        forward_params.update(configs)
        return preprocess_params, forward_params, postprocess_params

    def __call__(self, text_inputs, *args, questions=None, **kwargs):
        """Runs the method on `text_inputs` as the stock pipeline does; with `questions=`, answers every question
        about one long context (`text_inputs`, a string) without prefilling the context again.

        With `questions` (a string, or a list of strings, each appended to the context as it is), a KV method
        retains the context once (`KVCompressionCache.retain_context`) and every question selects its own KV from
        it (`"full"` reuses a `DynamicCache` of the context, as transformers' prompt-reuse recipe does); a
        prompt-compression method (`"specpc"`, `"specprefill"`, `"speckv_pc"`) answers each question over the whole
        text. Returns one output per question (the stock pipeline's output for `context + question`), or the one
        output for a single string.

        Example:

        ```python
        >>> answers = pipe(document, questions=["\nWho wrote it?", "\nWhen?"], max_new_tokens=16)
        ```
        """
        if questions is None:
            return super().__call__(text_inputs, *args, **kwargs)
        if not isinstance(text_inputs, str):
            raise TypeError(
                "With `questions=`, the first argument is the context they are asked about, as one string; got "
                f"{type(text_inputs).__name__}."
            )
        if kwargs.get("cache") is not None or kwargs.get("past_key_values") is not None:
            raise ValueError("With `questions=`, the pipeline keeps the context itself: do not pass a cache.")
        single = isinstance(questions, str)
        questions = [questions] if single else list(questions)
        template = self._context_cache(text_inputs, kwargs)
        outputs = []
        for question in questions:
            call = dict(kwargs) if template is None else dict(kwargs, cache=copy.deepcopy(template))
            outputs.append(super().__call__(text_inputs + question, *args, **call))
        return outputs[0] if single else outputs

    def _context_cache(self, context: str, kwargs: dict):
        """A cache holding `context` for the call's method (a retained context, or a `DynamicCache` for `"full"`),
        which every question deep-copies; `None` for prompt-compression methods."""
        method = kwargs.get("method") or self._forward_params.get("method", "speckv")
        spec = get_method(method)
        ids = self.tokenizer(context, return_tensors="pt")["input_ids"].to(self.model.device)
        if spec.name == "full":
            cache = DynamicCache()
            with torch.no_grad():
                self.model(input_ids=ids, use_cache=True, **{compat.cache_kwarg_name(self.model): cache})
            return cache
        if spec.budget != "kv" or spec.name == "speckv_pc":
            return None
        configs = {name: kwargs.get(name) or self._forward_params.get(name) for name in spec.config_arguments}
        prepare = spec.build(self.draft_model if spec.uses_draft else None,
                             **{name: config for name, config in configs.items() if config is not None})
        cache = prepare(self.model, ids, torch.ones_like(ids)).cache
        return cache.retain_context(self.model, ids)

    def _forward(self, model_inputs, method: str = "speckv", user_cache=None, **generate_kwargs):
        spec = get_method(method)
        configs = {name: generate_kwargs.pop(name) for name in CONFIG_ARGUMENTS if name in generate_kwargs}
        if spec.uses_draft and self.draft_model is None:
            raise ValueError(f"Method {spec.name!r} needs the pipeline's `draft_model=`.")
        if user_cache is not None and not _takes_users_cache(spec, user_cache):
            raise ValueError(_users_cache_error(spec, user_cache))
        input_ids, attention_mask = model_inputs["input_ids"], model_inputs.get("attention_mask")
        batch = input_ids.shape[0]
        stats = [dict(prompt_tokens=int(n)) for n in (attention_mask.sum(-1) if attention_mask is not None
                                                       else [input_ids.shape[1]] * batch)]
        prepare = spec.build(self.draft_model if spec.uses_draft else None,
                             **{name: config for name, config in configs.items() if name in spec.config_arguments})
        prepared = prepare(self.model, input_ids, attention_mask)
        prepared_inputs = prepared.model_inputs
        if "position_ids" in prepared_inputs:  # original positions (SpecPrefill): the base pipeline drops extra inputs
            generate_kwargs["position_ids"] = prepared_inputs.pop("position_ids")
        model_inputs = dict(model_inputs, **prepared_inputs)
        compressed, cache = prepared.compressed, prepared.cache
        if user_cache is not None:
            prepared.cache = cache = user_cache
        draft_tokens = draft_valid = None
        if compressed is not None:
            draft_tokens, draft_valid = compressed.draft_tokens, compressed.draft_tokens_valid
            for row, item in enumerate(stats):
                item.update(specpc_kept_tokens=int(compressed.kept_lengths[row]), draft_seconds=compressed.draft_seconds)
        generate_kwargs.update(prepared.cache_kwargs(self.model))
        monitor = None
        if spec.uses_draft:
            monitor = DraftAgreementMonitor(cache if cache is not None else draft_tokens, draft_valid)
            processors = LogitsProcessorList(generate_kwargs.pop("logits_processor", None) or [])
            processors.append(monitor)
            generate_kwargs["logits_processor"] = processors
        outputs = super()._forward(model_inputs, **generate_kwargs)

        sequences = outputs["generated_sequence"]  # (batch, num_return_sequences, length)
        flat = sequences.reshape(-1, sequences.shape[-1])
        ours = isinstance(cache, KVCompressionCache)
        compressed_kv = ours and cache.is_compressed
        agreement = None
        if monitor is not None and (not ours or (compressed_kv and cache.lookahead_ids is not None)):
            agreement = monitor.agreement(flat).reshape(batch, -1)
        kept = _real_kept_per_row(cache, batch) if compressed_kv else None
        for row, item in enumerate(stats):
            if ours:
                item["kv_kept_per_layer"] = None if kept is None else kept[row]
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


def _takes_users_cache(spec, user_cache) -> bool:
    """Whether a method can use a cache the user passes for one call (as given, its own knobs apply)."""
    if spec.name == "full":
        return True
    return spec.budget == "kv" and spec.name != "speckv_pc" and isinstance(user_cache, KVCompressionCache)


def _users_cache_error(spec, user_cache) -> str:
    return (f"Method {spec.name!r} cannot use the given cache ({type(user_cache).__name__}): a KV method takes a "
            "compressing cache (e.g. a `SpecKVCache`, which is then used as given: its own budget and knobs apply), "
            "`\"full\"` any transformers cache, and the prompt-compression methods none.")


def _real_kept_per_row(cache, batch: int) -> list[int]:
    """Real (non-padding) prompt positions kept per full-attention layer and KV head, for each of the `batch` input
    rows, counted as `max_capacity_prompt` counts them (the re-fed last prompt token apart). The cache may hold
    `batch * k` rows (beams, `num_return_sequences`): the `k` copies of an input row share its prompt, so the first
    copy speaks for it. The smallest count over heads is reported (they agree: padding scores lowest), averaged over the
    layers and rounded (layers agree too, but under layer-wise budgets, whose average is `max_capacity_prompt`)."""
    counts = []
    for layer_idx in range(len(cache.layers)):
        kept = cache.kept_positions(layer_idx)  # (rows, kv_heads, kept), positions in the left-padded prompt
        if kept is None:
            continue
        mask = cache.prompt_mask.to(kept.device).bool()  # (rows, prompt_length)
        real = mask.gather(1, kept.reshape(kept.shape[0], -1)).reshape(kept.shape).sum(-1)  # (rows, kv_heads)
        counts.append(real.amin(-1))
    per_cache_row = torch.stack(counts).float().mean(0)
    copies = per_cache_row.shape[0] // batch
    return [int(round(float(per_cache_row[row * copies]))) for row in range(batch)]


def __getattr__(name: str):
    if name == "METHODS":  # removed in 0.2: the registry's `METHODS` is the one list of methods
        import warnings

        warnings.warn("`hf_specapprox.integrations.pipeline.METHODS` is removed: the pipeline runs every method of "
                      "`hf_specapprox.integrations.registry.METHODS`; the old name goes in the next minor version.",
                      FutureWarning, stacklevel=2)
        return tuple(REGISTRY)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


PIPELINE_REGISTRY.register_pipeline(
    TASK, pipeline_class=SpecApproxTextGenerationPipeline, pt_model=AutoModelForCausalLM, type="text"
)
