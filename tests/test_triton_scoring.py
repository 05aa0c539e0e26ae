"""The Triton scoring kernels equal the torch reference (on CUDA, or on CPU under TRITON_INTERPRET=1).

The tox environment that installs Triton sets TRITON_INTERPRET=1, so these run on every CI pass at tiny shapes; on a
GPU machine they run on CUDA tensors. bf16 is checked on CUDA only: Triton's interpreter computes bf16 dot products
wrongly (checked with Triton 3.9: a plain 16×16 bf16 `tl.dot` is off by ~1e10).
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

pytest.importorskip("triton")

import hf_specapprox as hs  # noqa: E402
from hf_specapprox.kernels import triton_is_usable, window_scores  # noqa: E402
from oracle import oracle_logits  # noqa: E402
from tiny_models import random_batch, tiny_model  # noqa: E402

pytestmark = pytest.mark.skipif(
    not triton_is_usable(), reason="Triton needs a GPU driver here, or TRITON_INTERPRET=1 (tox sets it)"
)
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if DEVICE == "cuda" else [])
# Max abs error allowed against the fp32 reference on probabilities in [0, 1].
TOLERANCE = {torch.float32: 1e-5, torch.float16: 3e-3, torch.bfloat16: 3e-2}


@settings(max_examples=25, deadline=None)
@given(
    batch=st.integers(1, 2),
    kv_heads=st.integers(1, 3),
    group=st.sampled_from([1, 2, 4]),
    window=st.integers(1, 40),
    num_keys=st.integers(1, 100),
    head_dim=st.sampled_from([8, 16, 24]),
    reduction=st.sampled_from(["max", "mean"]),
    dtype=st.sampled_from(DTYPES),
    mask_keys=st.booleans(),
    seed=st.integers(0, 10_000),
)
def test_triton_equals_reference(batch, kv_heads, group, window, num_keys, head_dim, reduction, dtype, mask_keys, seed):
    generator = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, kv_heads * group, window, head_dim, generator=generator)
    k = torch.randn(batch, kv_heads, num_keys, head_dim, generator=generator)
    key_valid = (torch.rand(batch, num_keys, generator=generator) > 0.25) if mask_keys else None
    query_valid = torch.rand(batch, window, generator=generator) > 0.2
    kwargs = dict(scaling=head_dim**-0.5, query_offset=num_keys - window, query_valid=query_valid,
                  key_valid=key_valid, reduction=reduction)
    q_low, k_low = q.to(dtype), k.to(dtype)
    expected = window_scores(q_low.float(), k_low.float(), implementation="torch", **kwargs)
    on_device = {key: (value.to(DEVICE) if isinstance(value, torch.Tensor) else value) for key, value in kwargs.items()}
    actual = window_scores(q_low.to(DEVICE), k_low.to(DEVICE), implementation="triton", **on_device).cpu()
    assert actual.dtype == torch.float32 and not torch.isnan(actual).any()
    assert (actual - expected).abs().max().item() <= TOLERANCE[dtype]


def test_non_contiguous_window_slice():
    generator = torch.Generator().manual_seed(1)
    q = torch.randn(1, 4, 30, 16, generator=generator).to(DEVICE)[:, :, 18:, :]  # a view, as the prefill passes it
    k = torch.randn(1, 2, 30, 16, generator=generator).to(DEVICE)
    kwargs = dict(scaling=0.25, query_offset=18)
    torch.testing.assert_close(
        window_scores(q, k, implementation="triton", **kwargs).cpu(),
        window_scores(q.cpu(), k.cpu(), implementation="torch", **kwargs),
        atol=1e-5, rtol=0,
    )


def test_fully_masked_rows_are_zero_not_nan():
    q, k = torch.randn(1, 2, 3, 16).to(DEVICE), torch.randn(1, 1, 5, 16).to(DEVICE)
    valid = torch.zeros(1, 5, dtype=torch.bool, device=DEVICE)
    scores = window_scores(q, k, implementation="triton", scaling=0.5, query_offset=2, key_valid=valid)
    assert torch.equal(scores.cpu(), torch.zeros(1, 1, 5))


@pytest.mark.parametrize("family", ["llama", "gemma3"])
def test_speckv_with_triton_scoring_selects_the_same_and_matches_oracle(family):
    target = tiny_model(family, seed=41, num_heads=4, num_kv_heads=2, head_dim=16).to(DEVICE)
    draft = tiny_model("llama", seed=42, num_layers=1, head_dim=16).to(DEVICE)
    ids, mask = random_batch(2, 40, [0, 6], seed=43)
    ids, mask = ids.to(DEVICE), mask.to(DEVICE)
    results = {}
    for implementation in ("torch", "triton"):
        cache = hs.SpecKVCache(draft=draft, model=target, max_capacity_prompt=16, window_size=4, lookahead_tokens=4,
                               scoring_implementation=implementation)
        out = target.generate(input_ids=ids, attention_mask=mask, past_key_values=cache, max_new_tokens=3,
                              min_new_tokens=3, do_sample=False, pad_token_id=0, output_logits=True,
                              return_dict_in_generate=True)
        results[implementation] = (cache, out)
    torch_cache, _ = results["torch"]
    triton_cache, out = results["triton"]
    kept = {}
    for layer in range(len(triton_cache.layers)):
        if triton_cache.kept_positions(layer) is not None:
            assert torch.equal(triton_cache.kept_positions(layer), torch_cache.kept_positions(layer))
            kept[layer] = triton_cache.kept_positions(layer).cpu()
    target = target.cpu()  # the oracle runs on CPU
    valid = torch.cat([mask.bool().cpu(), torch.ones(2, 2, dtype=torch.bool)], 1)
    expected = oracle_logits(target, out.sequences[:, :-1].cpu(), valid, 40, kept)[:, 39:]
    torch.testing.assert_close(torch.stack(out.logits, 1).cpu(), expected, atol=1e-4, rtol=0)


@pytest.mark.parametrize("num_splits", [1, 2, 3, 5])
def test_split_key_logsumexp_merges_exactly(num_splits):
    generator = torch.Generator().manual_seed(num_splits)
    q = torch.randn(1, 4, 20, 16, generator=generator)
    k = torch.randn(1, 2, 300, 16, generator=generator)
    key_valid = torch.rand(1, 300, generator=generator) > 0.3
    kwargs = dict(scaling=0.25, query_offset=280, key_valid=key_valid, reduction="max")
    expected = window_scores(q, k, implementation="torch", **kwargs)
    on_device = dict(kwargs, key_valid=key_valid.to(DEVICE))
    actual = window_scores(q.to(DEVICE), k.to(DEVICE), implementation="triton", num_splits=num_splits, **on_device)
    torch.testing.assert_close(actual.cpu(), expected, atol=1e-5, rtol=0)
