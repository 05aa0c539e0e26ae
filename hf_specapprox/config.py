"""Validated configuration objects for the KV-cache compression methods.

Defaults reproduce the official SpecKV code (arXiv 2506.08373, `cfg/paper/speckv`): window 32, max-pool with kernel 7,
max reduction over the window queries and the query heads of each KV head.
"""

from __future__ import annotations

import json
import operator
import os
from dataclasses import asdict, dataclass, fields
from typing import ClassVar

from .compat import keep_extra_generation_attributes

POOL_TYPES = ("max", "mean")
REDUCTION_TYPES = ("max", "mean")
SCORING_IMPLEMENTATIONS = ("auto", "torch", "triton")
SPARSE_PREFILL_MODES = ("auto", "on", "off")
#: How kept positions are spread over the compressed layers (see `hf_specapprox.kv.policies`).
LAYER_BUDGETS = ("uniform", "pyramid")
#: How the draft decodes its lookahead (see `hf_specapprox.modeling.draft.generate_lookahead`).
LOOKAHEAD_DECODING_MODES = ("generation_config", "argmax")


def _check_positive_int(name: str, value, minimum: int = 1) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"`{name}` must be an int, got {type(value).__name__} ({value!r}).")
    if value < minimum:
        raise ValueError(f"`{name}` must be >= {minimum}, got {value}.")


def _check_choice(name: str, value, choices) -> None:
    if value not in choices:
        raise ValueError(f"`{name}` must be one of {choices}, got {value!r}.")


def _check_bool(name: str, value) -> None:
    if not isinstance(value, bool):
        raise TypeError(f"`{name}` must be True or False, got {type(value).__name__} ({value!r}).")


def token_id_tuple(value) -> tuple[int, ...]:
    """`protected_token_ids` as the one form a config holds: a tuple of non-negative Python ints (from `None`, one
    id, a list, a tuple, a tensor or numpy integers); raises `TypeError` / `ValueError` for anything else."""
    if value is None:
        return ()
    if hasattr(value, "tolist") and not isinstance(value, (list, tuple)):
        value = value.tolist()  # a tensor or numpy array
    if isinstance(value, int) and not isinstance(value, bool):
        value = (value,)
    if isinstance(value, (str, bytes)) or not hasattr(value, "__iter__"):
        raise TypeError(
            f"`protected_token_ids` must be a sequence of token ids (or None), got {type(value).__name__} ({value!r})."
            " Give e.g. `tokenizer.all_special_ids`, or `()` for none."
        )
    ids = []
    for item in value:
        if isinstance(item, bool):
            raise TypeError(f"`protected_token_ids` must hold integer token ids, got the bool {item!r}.")
        try:
            token = operator.index(item)
        except TypeError:
            raise TypeError(
                f"`protected_token_ids` must hold integer token ids, got {type(item).__name__} ({item!r}); convert "
                "tokens with `tokenizer.convert_tokens_to_ids`."
            ) from None
        if token < 0:
            raise ValueError(f"`protected_token_ids[...]` must be >= 0, got {token}.")
        ids.append(token)
    return tuple(ids)


#: The attribute of a `GenerationConfig` under which [`~ConfigMixin.to_generation_config`] stores a config.
GENERATION_CONFIG_KEY = "hf_specapprox"


class ConfigMixin:
    """Serialisation shared by every configuration dataclass, shaped like transformers' own configs.

    A config converts to and from a plain dict ([`to_dict`] / [`from_dict`]), a JSON string or file, and can ride in
    a model's `GenerationConfig` (so `generation_config.json` saved with the model carries the knobs): it is stored as
    `generation_config.hf_specapprox = {"method": <method>, **fields}`.
    """

    #: The name written as `"method"` in a `GenerationConfig`.
    method: ClassVar[str]

    def to_dict(self) -> dict:
        """The fields as a dict of plain Python values (tuples become lists, as in JSON)."""
        return {key: list(value) if isinstance(value, tuple) else value for key, value in asdict(self).items()}

    @classmethod
    def from_dict(cls, config_dict: dict):
        """Builds and validates a config from a dict such as [`to_dict`] returns.

        Raises:
            `TypeError`: `config_dict` is not a dict.
            `ValueError`: it has keys that are not fields of this config (typos would otherwise be ignored).
        """
        if not isinstance(config_dict, dict):
            raise TypeError(f"{cls.__name__}.from_dict needs a dict, got {type(config_dict).__name__}.")
        names = [field.name for field in fields(cls)]
        unknown = sorted(set(config_dict) - set(names))
        if unknown:
            raise ValueError(f"{cls.__name__} has no field(s) {unknown}; its fields are {names}.")
        return cls(**config_dict)

    def to_json_string(self) -> str:
        """The config as a JSON string (sorted keys, indented)."""
        return json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n"

    @classmethod
    def from_json_string(cls, json_string: str):
        """Builds a config from [`to_json_string`]'s output."""
        try:
            config_dict = json.loads(json_string)
        except json.JSONDecodeError as error:
            raise ValueError(f"{cls.__name__}.from_json_string: not valid JSON ({error}).") from None
        return cls.from_dict(config_dict)

    def to_json_file(self, json_file_path: str | os.PathLike) -> None:
        """Writes [`to_json_string`] to `json_file_path`."""
        with open(json_file_path, "w", encoding="utf-8") as handle:
            handle.write(self.to_json_string())

    @classmethod
    def from_json_file(cls, json_file_path: str | os.PathLike):
        """Reads a config written by [`to_json_file`]."""
        with open(json_file_path, encoding="utf-8") as handle:
            return cls.from_json_string(handle.read())

    def to_generation_config(self, generation_config) -> None:
        """Stores this config in `generation_config` (a `GenerationConfig`, e.g. `model.generation_config`) as the
        attribute `hf_specapprox = {"method": ..., **fields}`; `GenerationConfig.save_pretrained` writes it to
        `generation_config.json` and `from_pretrained` reads it back.

        Example:

        ```python
        >>> SpecKVConfig(max_capacity_prompt=256).to_generation_config(model.generation_config)
        >>> SpecKVConfig.from_generation_config(model.generation_config).max_capacity_prompt
        256
        ```
        """
        setattr(generation_config, GENERATION_CONFIG_KEY, {"method": self.method, **self.to_dict()})
        keep_extra_generation_attributes(generation_config)

    @classmethod
    def from_generation_config(cls, generation_config):
        """Reads the config that [`to_generation_config`] stored in `generation_config`.

        Raises:
            `ValueError`: `generation_config` holds no `hf_specapprox` entry, or one written for another method.
        """
        stored = getattr(generation_config, GENERATION_CONFIG_KEY, None)
        if not isinstance(stored, dict):
            raise ValueError(
                f"This generation config holds no `{GENERATION_CONFIG_KEY}` entry; store one with "
                f"`{cls.__name__}(...).to_generation_config(generation_config)`."
            )
        stored = dict(stored)
        method = stored.pop("method", None)
        if method != cls.method:
            raise ValueError(
                f"The generation config's `{GENERATION_CONFIG_KEY}` entry is for method {method!r}, not "
                f"{cls.method!r} ({cls.__name__})."
            )
        return cls.from_dict(stored)


def resolve_config(config_class, config, config_kwargs: dict):
    """`config` if given (checked to be a `config_class`), else `config_class(**config_kwargs)`; never both."""
    if config is not None and config_kwargs:
        raise ValueError("Pass either `config` or individual knobs, not both.")
    if config is None:
        return config_class(**config_kwargs)
    if not isinstance(config, config_class):
        raise TypeError(f"`config` must be a {config_class.__name__}, got {type(config).__name__}.")
    return config


@dataclass
class KVSelectionConfig(ConfigMixin):
    """Knobs shared by every prompt-KV selection method.

    Args:
        max_capacity_prompt (`int`, *optional*, defaults to 1024):
            Number of prompt positions kept in every full-attention layer and KV head, the recent window included
            (the average over the layers under layer-wise budgets). The last prompt token is re-computed against the
            compressed cache (as in the paper's code), so a layer holds `max_capacity_prompt + 1` rows after the
            prefill, then one more per generated token. Prompts that are not longer than this are not compressed.
        layer_budgets (`str`, *optional*, defaults to `"uniform"`):
            How the kept positions are spread over the compressed layers: `"uniform"` (the same number in every layer,
            as every method's paper does) or `"pyramid"` (PyramidKV, Cai et al., 2024: more candidates in lower layers,
            fewer in upper ones, linearly, the same total; every KV head of a layer keeps the same number, so the
            memory is really saved). Layer-wise budgets need a bound target with `sdpa` or `eager` attention and the
            dynamic decoding path; see `hf_specapprox.kv.policies.pyramid_budgets`.
        pyramid_beta (`int`, *optional*, defaults to 20):
            PyramidKV's `beta`: the top layer keeps `1 / beta` of the average number of candidates.
    """

    method: ClassVar[str] = "kv_selection"
    #: Whether `max_capacity_prompt=None` (keep every prompt position) is allowed: SpecKV's sparse prefill only.
    allows_keep_all: ClassVar[bool] = False

    max_capacity_prompt: int | None = 1024
    layer_budgets: str = "uniform"
    pyramid_beta: int = 20

    @property
    def keeps_all(self) -> bool:
        """Whether every prompt position is kept (`max_capacity_prompt=None`: the sparse prefill without eviction)."""
        return self.max_capacity_prompt is None

    def validate(self) -> None:
        """Checks every field (types, ranges, combinations) and raises `TypeError` / `ValueError` with what to change.
        Cheap (no tensors); called at construction and again when the config is used, so edits are checked too."""
        if self.max_capacity_prompt is None and not self.allows_keep_all:
            raise ValueError(
                f"`max_capacity_prompt=None` (keep every prompt position) is SpecKV's sparse prefill without eviction; "
                f"{type(self).__name__} needs a budget (a positive int)."
            )
        if self.max_capacity_prompt is not None:
            _check_positive_int("max_capacity_prompt", self.max_capacity_prompt)
        _check_choice("layer_budgets", self.layer_budgets, LAYER_BUDGETS)
        _check_positive_int("pyramid_beta", self.pyramid_beta)

    def __post_init__(self):
        self.validate()


@dataclass
class AttentionSelectionConfig(KVSelectionConfig):
    """Knobs of the methods whose scores are the attention of a window of queries (SpecKV, SnapKV).

    Args:
        max_capacity_prompt (`int`, *optional*, defaults to 1024):
            Prompt positions kept per layer and KV head, window included.
        window_size (`int`, *optional*, defaults to 32):
            Recent prompt tokens that vote and are always kept.
        kernel_size (`int`, *optional*, defaults to 7):
            Width of the 1-D pooling applied to the scores along the key axis; must be odd.
        pool_type (`str`, *optional*, defaults to `"max"`):
            `"max"` (max-pool, implicit -inf padding) or `"mean"` (average pool, zero padding).
        reduction_type (`str`, *optional*, defaults to `"max"`):
            How the scores of the voting queries and of the query heads sharing a KV head are combined: `"max"` or
            `"mean"`.
        scoring_implementation (`str`, *optional*, defaults to `"auto"`):
            `"auto"` uses the fused Triton kernels for CUDA tensors when Triton works there, the chunked torch
            reference otherwise; `"torch"` or `"triton"` force one.
        sparse_prefill (`str`, *optional*, defaults to `"off"`):
            Vertical-slash sparse attention in the compressing layers of the prefill forward (the paper's code,
            MInference's mask): `"auto"` when prompt + lookahead exceed `sparse_prefill_threshold` tokens, `"on"`
            always, `"off"` never (dense). Each layer is scored first (the scores stay exact and dense); its attention
            output is then computed under the sparse mask. In a padded batch each row decides on its own tokens, as
            it would alone. Needs FlexAttention (torch >= 2.5).
        sparse_prefill_threshold (`int`, *optional*, defaults to 4096):
            Prompt + lookahead length above which `"auto"` switches the sparse prefill on (the paper's
            `prefill_vertical_size + prefill_window_size`).
        prefill_vertical_size (`int`, *optional*, defaults to 2048):
            Vertical columns: the best-scoring candidate keys of each KV head, seen by every query.
        prefill_window_size (`int`, *optional*, defaults to 2048):
            Band: each block of `prefill_block_size` queries also sees the `prefill_window_size + prefill_block_size`
            keys before its block end (MInference's slash diagonals every block, merged).
        prefill_block_size (`int`, *optional*, defaults to 64):
            Query block size of the band, blocks aligned to each row's first token (as with the row alone).
    """

    method: ClassVar[str] = "attention_selection"

    window_size: int = 32
    kernel_size: int = 7
    pool_type: str = "max"
    reduction_type: str = "max"
    scoring_implementation: str = "auto"
    sparse_prefill: str = "off"
    sparse_prefill_threshold: int = 4096
    prefill_vertical_size: int = 2048
    prefill_window_size: int = 2048
    prefill_block_size: int = 64

    def validate(self) -> None:
        super().validate()
        _check_positive_int("window_size", self.window_size)
        _check_positive_int("kernel_size", self.kernel_size)
        if self.kernel_size % 2 == 0:
            raise ValueError(
                f"`kernel_size` must be odd so the pooling window is centred on each key, got {self.kernel_size}; "
                f"use {self.kernel_size - 1} or {self.kernel_size + 1}."
            )
        _check_choice("pool_type", self.pool_type, POOL_TYPES)
        _check_choice("reduction_type", self.reduction_type, REDUCTION_TYPES)
        _check_choice("scoring_implementation", self.scoring_implementation, SCORING_IMPLEMENTATIONS)
        _check_choice("sparse_prefill", self.sparse_prefill, SPARSE_PREFILL_MODES)
        _check_positive_int("sparse_prefill_threshold", self.sparse_prefill_threshold, minimum=0)
        _check_positive_int("prefill_vertical_size", self.prefill_vertical_size, minimum=0)
        _check_positive_int("prefill_window_size", self.prefill_window_size, minimum=0)
        _check_positive_int("prefill_block_size", self.prefill_block_size)
        if self.sparse_prefill != "off":  # the official code's guards (`speckv/speckv.py`), where it can run
            if self.prefill_window_size % self.prefill_block_size:
                raise ValueError(
                    f"`prefill_window_size` ({self.prefill_window_size}) must be a multiple of `prefill_block_size` "
                    f"({self.prefill_block_size}): the band is whole query blocks (the paper's 2048 and 64)."
                )
            if self.max_capacity_prompt is not None and \
                    self.max_capacity_prompt > self.prefill_window_size + self.prefill_vertical_size:
                raise ValueError(
                    f"`max_capacity_prompt` ({self.max_capacity_prompt}) must not exceed `prefill_window_size + "
                    f"prefill_vertical_size` ({self.prefill_window_size + self.prefill_vertical_size}) with the sparse "
                    "prefill on: the kept keys would include ones no query of the prefill attended to beyond the band "
                    "and the vertical columns. Lower the budget, widen the band or the columns, or use "
                    "`sparse_prefill='off'`."
                )
        if self.max_capacity_prompt is None:
            if self.sparse_prefill == "off":
                raise ValueError(
                    "`max_capacity_prompt=None` keeps every prompt position: it is the sparse prefill without "
                    "eviction, so it needs `sparse_prefill='auto'` or `'on'` (with it off, use a `DynamicCache`)."
                )
            return
        if self.max_capacity_prompt <= self.window_size:
            raise ValueError(
                f"`max_capacity_prompt` ({self.max_capacity_prompt}) must be larger than `window_size` "
                f"({self.window_size}): the budget includes the window and needs room for selected tokens. "
                f"Raise the budget or lower the window."
            )


@dataclass
class SpecKVConfig(AttentionSelectionConfig):
    """Configuration of SpecKV (draft-based KV dropping, paper §2.1).

    Args:
        max_capacity_prompt (`int` or `None`, *optional*, defaults to 1024):
            Prompt positions kept per layer and KV head, the `window_size` most recent ones included (the paper's
            `C_max`; it used 256, 512 and 1024). `None` keeps every position: the sparse prefill without eviction
            (the official code's `max_capacity_prompt=None`), for the long-prompt speed-up without the risk of
            dropping KV; the draft and the scoring run only when the prefill goes sparse.
        window_size (`int`, *optional*, defaults to 32):
            The `w` most recent prompt tokens before the last one are always kept. The scoring queries are the last
            `w + 1` prompt tokens plus every lookahead token.
        lookahead_tokens (`int`, *optional*, defaults to 64):
            Number of tokens the draft generates greedily (it stops earlier at EOS). The paper's code used the
            task's `max_new_tokens` (64 to 512); a cache cannot see `generate`'s `max_new_tokens`, so set this to
            the length of the answers you expect. `0` scores with the prompt window only.
        lookahead_decoding (`str`, *optional*, defaults to `"generation_config"`):
            How the draft writes its lookahead. `"generation_config"`: what `draft.generate(do_sample=False)` writes,
            i.e. greedy after every logits processor the draft checkpoint's generation config enables (Qwen2.5's
            `repetition_penalty` of 1.1, for one), as the paper's code does (`speckv/speckv.py`, `eval.py`).
            `"argmax"`: the bare argmax of the logits, no processor (a deliberate deviation from the paper's code,
            identical to it for drafts whose generation config enables no processor, e.g. Llama-3.2-1B-Instruct).
        kernel_size (`int`, *optional*, defaults to 7):
            As in [`AttentionSelectionConfig`] (the paper's value).
        pool_type (`str`, *optional*, defaults to `"max"`):
            As in [`AttentionSelectionConfig`] (the paper's value).
        reduction_type (`str`, *optional*, defaults to `"max"`):
            As in [`AttentionSelectionConfig`] (the paper's value).
        scoring_implementation (`str`, *optional*, defaults to `"auto"`):
            As in [`AttentionSelectionConfig`].
        sparse_prefill (`str`, *optional*, defaults to `"auto"`):
            The paper's vertical-slash sparse prefill above `sparse_prefill_threshold` (4096) tokens of prompt +
            lookahead; see [`AttentionSelectionConfig`] for it and its other knobs (`sparse_prefill_threshold`,
            `prefill_vertical_size`, `prefill_window_size`, `prefill_block_size`; the paper's 4096, 2048, 2048, 64).
    """

    method: ClassVar[str] = "speckv"
    allows_keep_all: ClassVar[bool] = True

    lookahead_tokens: int = 64
    sparse_prefill: str = "auto"
    lookahead_decoding: str = "generation_config"

    def validate(self) -> None:
        super().validate()
        _check_positive_int("lookahead_tokens", self.lookahead_tokens, minimum=0)
        _check_choice("lookahead_decoding", self.lookahead_decoding, LOOKAHEAD_DECODING_MODES)


@dataclass
class SnapKVConfig(AttentionSelectionConfig):
    """Configuration of the SnapKV baseline (Li et al., 2024): the prompt's own last tokens vote, no draft.

    Defaults are SnapKV's own (its LongBench configs `experiments/LongBench/config/ablation_c*_w32_k7_maxpool.json`,
    `snapkv/monkeypatch/snapkv_utils.py`): window 32, **max**-pooling of width 7, the window's attention summed per
    key. The GQA group is reduced **per KV head** (the mean over the group's query heads and the window, which ranks
    as SnapKV's sum over the window does), as kvpress does, so every KV head keeps `max_capacity_prompt` pairs and
    the memory is the same as SpecKV's; SnapKV's own code repeats K/V to every query head and selects per query head
    (more memory for GQA models). `SnapKVConfig.kvpress()` gives kvpress's variant (window 64, average pooling of
    width 5).

    Args:
        max_capacity_prompt (`int`, *optional*, defaults to 1024):
            Prompt positions kept per layer and KV head, window included.
        window_size (`int`, *optional*, defaults to 32):
            Observation window: the last `window_size` prompt tokens are the scoring queries and are always kept.
        kernel_size (`int`, *optional*, defaults to 7):
            Pooling width (odd).
        pool_type (`str`, *optional*, defaults to `"max"`):
            SnapKV's max-pooling; `"mean"` is kvpress's average pooling (see `SnapKVConfig.kvpress()`).
        reduction_type (`str`, *optional*, defaults to `"mean"`):
            SnapKV sums the window's attention, which ranks like the mean used here.
        scoring_implementation (`str`, *optional*, defaults to `"auto"`):
            As in [`AttentionSelectionConfig`].
        sparse_prefill (`str`, *optional*, defaults to `"off"`):
            SnapKV's own prefill is dense; `"on"`/`"auto"` use SpecKV's sparse prefill (see
            [`AttentionSelectionConfig`]).
    """

    method: ClassVar[str] = "snapkv"

    pool_type: str = "max"
    reduction_type: str = "mean"

    @classmethod
    def kvpress(cls, **overrides) -> "SnapKVConfig":
        """kvpress's SnapKV (`kvpress/presses/snapkv_press.py`): window 64, average pooling of width 5, the mean over
        the window and the GQA group; `overrides` (e.g. `max_capacity_prompt=256`) replace any field."""
        return cls(**{"window_size": 64, "kernel_size": 5, "pool_type": "mean", "reduction_type": "mean",
                      **overrides})


@dataclass
class StreamingLLMConfig(KVSelectionConfig):
    """Configuration of the StreamingLLM baseline (Xiao et al., 2023): attention sinks plus the most recent tokens.

    As kvpress's `StreamingLLMPress`: the kept pairs keep their **original positions** (their keys are not
    re-rotated), and new tokens continue at the original prompt length. StreamingLLM's paper places cached tokens at
    their positions *within the cache* (re-rotating the keys); kvpress notes the same difference.

    Args:
        max_capacity_prompt (`int`, *optional*, defaults to 1024):
            Prompt positions kept per layer: `num_sink_tokens` first real tokens plus the most recent ones.
        num_sink_tokens (`int`, *optional*, defaults to 4):
            Number of leading (non-padding) tokens always kept.
    """

    method: ClassVar[str] = "streamingllm"

    num_sink_tokens: int = 4

    def validate(self) -> None:
        super().validate()
        _check_positive_int("num_sink_tokens", self.num_sink_tokens, minimum=0)
        if self.num_sink_tokens >= self.max_capacity_prompt:
            raise ValueError(
                f"`num_sink_tokens` ({self.num_sink_tokens}) must be smaller than `max_capacity_prompt` "
                f"({self.max_capacity_prompt})."
            )


@dataclass
class SpecPCConfig(ConfigMixin):
    """Configuration of SpecPC (draft-based prompt compression, paper §3.1).

    Args:
        max_capacity_prompt (`int`, *optional*, defaults to 1024):
            Prompt tokens passed to the target, window included (the paper used 1024, 2048 and 3072).
        window_size (`int`, *optional*, defaults to 64):
            The last `window_size` prompt tokens are always kept and are the draft queries whose attention is scored.
            Prompts shorter than the window use all their tokens as the window. Must not exceed
            `max_capacity_prompt` (the window is part of the budget).
        lookahead_tokens (`int`, *optional*, defaults to 1):
            Tokens the draft generates. 1 means a single prefill forward (the paper's setting); with more, the
            attention of every decode step votes too, and the tokens are returned (SpecKV-PC reuses them).
        lookahead_decoding (`str`, *optional*, defaults to `"generation_config"`):
            How the draft writes its tokens when `lookahead_tokens > 1`: as `draft.generate(do_sample=False)` does,
            with the draft checkpoint's generation config (the paper's code), or `"argmax"`; see [`SpecKVConfig`].
        kernel_size (`int`, *optional*):
            Width of the zero-padded pooling of the scores (may be even). `None` (the default) is resolved from the
            draft's family when a [`SpecPCPreprocessor`] is built, as the released configs (`cfg/paper/specpc/**`)
            set it: 32 for Llama-family drafts (`model_type` `llama`), 64 for Qwen-family drafts (`qwen*`), and 64
            for every other draft (the official `SpecPCConfig` default). The preprocessor's `config` then holds the
            resolved value; an explicit value always wins. See `hf_specapprox.config.resolve_specpc_kernel_size`.
        neighbor_tokens (`int`, *optional*):
            Tokens kept around each selected token, nearest first; defaults to `kernel_size` (as released).
        pool_type (`str`, *optional*, defaults to `"max"`):
            `"max"` or `"mean"` pooling.
        starting_layer_index (`int`, *optional*, defaults to 8):
            Draft layers below this index do not vote.
        weighted_query (`bool`, *optional*, defaults to `True`):
            Weight the window queries' attention linearly from 0 (oldest) to 1 (newest).
        num_sink_tokens (`int`, *optional*, defaults to 0):
            First real tokens of every row always kept (BOS, attention sinks). The paper protects none.
        protected_token_ids (`tuple[int, ...]`, *optional*, defaults to `()`):
            Token ids always kept wherever they occur (e.g. a chat template's special tokens); `None` means none.
            The paper protects none.
        scoring_implementation (`str`, *optional*, defaults to `"auto"`):
            As for [`SpecKVConfig`].
    """

    method: ClassVar[str] = "specpc"

    max_capacity_prompt: int = 1024
    window_size: int = 64
    lookahead_tokens: int = 1
    lookahead_decoding: str = "generation_config"
    kernel_size: int | None = None
    neighbor_tokens: int | None = None
    pool_type: str = "max"
    starting_layer_index: int = 8
    weighted_query: bool = True
    num_sink_tokens: int = 0
    protected_token_ids: tuple = ()
    scoring_implementation: str = "auto"

    def __setattr__(self, name, value):
        # One place checks `protected_token_ids`: every assignment (construction and later edits alike) stores the
        # normalised tuple, so a config edited with a list still equals its JSON round trip.
        if name == "protected_token_ids":
            value = token_id_tuple(value)
        super().__setattr__(name, value)

    def __post_init__(self):
        self.validate()

    def validate(self) -> None:
        """Checks every field (types, ranges, combinations) and raises `TypeError` / `ValueError` with what to change.
        Cheap (no tensors); called at construction and again when the config is used, so edits are checked too."""
        _check_positive_int("max_capacity_prompt", self.max_capacity_prompt)
        _check_positive_int("window_size", self.window_size)
        if self.window_size > self.max_capacity_prompt:
            raise ValueError(
                f"`window_size` ({self.window_size}) must not exceed `max_capacity_prompt` ({self.max_capacity_prompt}): "
                f"the always-kept window is part of the budget. Lower `window_size` to at most "
                f"{self.max_capacity_prompt} (e.g. `window_size=min(64, max_capacity_prompt)`)."
            )
        _check_positive_int("lookahead_tokens", self.lookahead_tokens)
        _check_choice("lookahead_decoding", self.lookahead_decoding, LOOKAHEAD_DECODING_MODES)
        if self.kernel_size is not None:
            _check_positive_int("kernel_size", self.kernel_size)
        if self.neighbor_tokens is not None:
            _check_positive_int("neighbor_tokens", self.neighbor_tokens)
        _check_choice("pool_type", self.pool_type, POOL_TYPES)
        _check_positive_int("starting_layer_index", self.starting_layer_index, minimum=0)
        _check_bool("weighted_query", self.weighted_query)
        _check_positive_int("num_sink_tokens", self.num_sink_tokens, minimum=0)
        _check_choice("scoring_implementation", self.scoring_implementation, SCORING_IMPLEMENTATIONS)

    @property
    def resolved_neighbor_tokens(self) -> int | None:
        """Tokens kept around each selected token: `neighbor_tokens`, else `kernel_size` (`None` until resolved)."""
        return self.neighbor_tokens or self.kernel_size

    @property
    def neighbours(self) -> int | None:
        """Deprecated name of [`resolved_neighbor_tokens`]."""
        import warnings

        warnings.warn("`SpecPCConfig.neighbours` is renamed `resolved_neighbor_tokens`; the old name will be removed in "
                      "the next minor version.", FutureWarning, stacklevel=2)
        return self.resolved_neighbor_tokens


#: SpecPC's pooling kernel (and neighbours) per draft family in the released configs (`cfg/paper/specpc/**`).
SPECPC_KERNEL_BY_FAMILY = {"llama": 32, "qwen": 64}
#: The kernel for drafts of any other family: the official `SpecPCConfig` default.
SPECPC_DEFAULT_KERNEL = 64


def draft_family(draft_config) -> str | None:
    """`"llama"` or `"qwen"` for a draft (or its config) of those families, `None` otherwise: read from the text
    config's `model_type` (`llama` → `"llama"`, `qwen2`, `qwen3`, `qwen2_moe`, ... → `"qwen"`)."""
    config = getattr(draft_config, "config", draft_config)
    if hasattr(config, "get_text_config"):
        config = config.get_text_config(decoder=True)
    model_type = str(getattr(config, "model_type", "") or "")
    if model_type == "llama":
        return "llama"
    if model_type.startswith("qwen"):
        return "qwen"
    return None


def resolve_specpc_kernel_size(draft) -> int:
    """SpecPC's released kernel (and neighbours) for `draft`'s family: 32 for Llama, 64 for Qwen, 64 otherwise."""
    family = draft_family(draft) if draft is not None else None
    return SPECPC_KERNEL_BY_FAMILY.get(family, SPECPC_DEFAULT_KERNEL)
