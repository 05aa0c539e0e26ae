"""Inputs that cannot work are refused before the draft runs, with an error that says what to do (issue 11, item 9):
draft vocabularies in both directions, prompt ids the draft cannot read, SpecPC's empty and all-padding inputs,
protected ids and masks, configs edited after construction."""

from __future__ import annotations

import contextlib

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import hf_specapprox as hs
from hf_specapprox.modeling import draft as draft_checks
from tiny_models import random_batch, tiny_model

SPECKV = dict(max_capacity_prompt=12, window_size=3, lookahead_tokens=4)
SPECPC = dict(max_capacity_prompt=12, window_size=3, kernel_size=3, starting_layer_index=0)


@contextlib.contextmanager
def counting_forwards(*modules):
    """Counts forward calls of each module (a forward pre-hook, removed on exit)."""
    counts = [0] * len(modules)
    handles = []
    for index, module in enumerate(modules):
        def hook(*_, index=index):
            counts[index] += 1
        handles.append(module.register_forward_pre_hook(hook))
    try:
        yield counts
    finally:
        for handle in handles:
            handle.remove()


@pytest.fixture(scope="module")
def target():
    return tiny_model("llama", seed=21)  # 97 ids


def generate(target, cache, ids, mask=None):
    return target.generate(input_ids=ids, attention_mask=mask, past_key_values=cache, max_new_tokens=3,
                           do_sample=False, pad_token_id=0)


# ---------------------------------------------------------------------------------------------------------------------
# Draft vocabularies
# ---------------------------------------------------------------------------------------------------------------------
def test_a_smaller_draft_vocabulary_is_refused_for_prompts_it_cannot_read(target):
    """Before: the draft (90 ids) passed the check and failed with IndexError inside its embedding."""
    draft = tiny_model("llama", seed=22, num_layers=1, vocab_size=90)
    ids, mask = random_batch(2, 30, [0, 4], seed=1)
    assert int(ids.max()) >= 90
    cache = hs.SpecKVCache(draft=draft, model=target, **SPECKV)
    with counting_forwards(draft, target.model) as calls, pytest.raises(ValueError, match="the draft cannot read"):
        generate(target, cache, ids, mask)
    assert calls == [0, 0]  # neither the draft nor the target's scoring forward ran


def test_a_smaller_draft_vocabulary_serves_prompts_it_can_read(target):
    """The rule is exact: ids below the draft's 90 are fine (a vocabulary padded differently, as within a family)."""
    draft = tiny_model("llama", seed=22, num_layers=1, vocab_size=90)
    ids, mask = random_batch(2, 30, [0, 4], seed=1)
    ids = ids % 87 + 3 * mask  # real tokens in 3..89, padding 0
    cache = hs.SpecKVCache(draft=draft, model=target, **SPECKV)
    out = generate(target, cache, ids, mask)
    assert cache.is_compressed and out.shape == (2, 33)


@pytest.mark.parametrize("draft_vocab, target_vocab, message", [(98, 97, "larger than the target's"),
                                                                 (97, 2000, "much smaller")])
def test_vocabularies_are_checked_in_both_directions_before_any_work(draft_vocab, target_vocab, message):
    target = tiny_model("llama", seed=23, vocab_size=target_vocab)
    draft = tiny_model("llama", seed=24, num_layers=1, vocab_size=draft_vocab)
    with pytest.raises(ValueError, match=message):
        draft_checks.check_draft_compatible(draft, target)
    ids, mask = random_batch(1, 30, [0], seed=2)
    cache = hs.SpecKVCache(draft=draft, model=target, **SPECKV)
    with counting_forwards(draft, target.model) as calls, pytest.raises(ValueError, match=message):
        generate(target, cache, ids, mask)
    assert calls == [0, 0]


def test_the_emitting_head_counts_not_only_the_config():
    """The draft emits ids of its head's width: a head wider than the target's embedding is refused even when the
    configs agree."""
    target = tiny_model("llama", seed=25)
    draft = tiny_model("llama", seed=26, num_layers=1)
    draft.lm_head = torch.nn.Linear(draft.lm_head.in_features, 120, bias=False)
    with pytest.raises(ValueError, match=r"vocabulary \(120 ids\) is larger"):
        draft_checks.check_draft_compatible(draft, target)


def test_prompt_id_messages():
    draft = tiny_model("llama", seed=27, num_layers=1, vocab_size=50)
    ids = torch.tensor([[60, 5, 6], [7, 8, 9]])
    mask = torch.tensor([[0, 1, 1], [1, 1, 1]])
    with pytest.raises(ValueError, match="padding id 60"):
        draft_checks.check_prompt_ids(draft, ids, mask)
    with pytest.raises(ValueError, match=r"token id 60 \(row 0, position 0\)"):
        draft_checks.check_prompt_ids(draft, ids)
    with pytest.raises(ValueError, match="token id -1"):
        draft_checks.check_prompt_ids(draft, torch.tensor([[3, -1]]))
    with pytest.raises(TypeError, match="integer token ids"):
        draft_checks.check_prompt_ids(draft, torch.tensor([[3.0, 4.0]]))
    draft_checks.check_prompt_ids(draft, torch.tensor([[0, 49]]))
    draft_checks.check_prompt_ids(draft, torch.zeros(2, 0, dtype=torch.long))
    with pytest.raises(ValueError, match="target cannot read"):
        draft_checks.check_lookahead_ids(draft, torch.tensor([[3, 50]]))


class _Embedder:
    def __init__(self, rows):
        self.embedding = torch.nn.Embedding(rows, 1)

    def get_input_embeddings(self):
        return self.embedding


@settings(max_examples=60, deadline=None)
@given(rows=st.integers(1, 40), ids=st.lists(st.lists(st.integers(-3, 45), min_size=3, max_size=3), min_size=1,
                                             max_size=4))
def test_prompt_ids_are_refused_exactly_when_one_is_out_of_range(rows, ids):
    outside = any(not 0 <= i < rows for row in ids for i in row)
    if outside:
        with pytest.raises(ValueError):
            draft_checks.check_prompt_ids(_Embedder(rows), torch.tensor(ids))
    else:
        draft_checks.check_prompt_ids(_Embedder(rows), torch.tensor(ids))


# ---------------------------------------------------------------------------------------------------------------------
# SpecPC
# ---------------------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def draft():
    return tiny_model("llama", seed=28, num_layers=2)


def refused_before_the_draft(draft, preprocessor, *args, error=ValueError, match, **kwargs):
    with counting_forwards(draft) as calls, pytest.raises(error, match=match):
        preprocessor(*args, **kwargs)
    assert calls == [0]


def test_specpc_refuses_prompt_ids_its_draft_cannot_read():
    """Before: IndexError inside the draft's embedding."""
    small = tiny_model("llama", seed=29, num_layers=2, vocab_size=60)
    ids, mask = random_batch(2, 30, [0, 4], seed=3)
    refused_before_the_draft(small, hs.SpecPCPreprocessor(small, **SPECPC), ids, mask, match="the draft cannot read")


def test_specpc_all_padding_row(draft):
    """Before: called "right-padded"."""
    ids, mask = random_batch(2, 20, [0, 20], seed=4)
    refused_before_the_draft(draft, hs.SpecPCPreprocessor(draft, **SPECPC), ids, mask,
                             match=r"Rows \[1\] of the batch are all padding")


def test_specpc_empty_prompts_and_batches(draft):
    """Before: IndexError (0 columns) from the padding check."""
    specpc = hs.SpecPCPreprocessor(draft, **SPECPC)
    refused_before_the_draft(draft, specpc, torch.zeros(2, 0, dtype=torch.long), match="prompts are empty")
    refused_before_the_draft(draft, specpc, torch.zeros(0, 5, dtype=torch.long), match="batch is empty")
    refused_before_the_draft(draft, hs.RecencyPreprocessor(max_capacity_prompt=4), torch.zeros(1, 0, dtype=torch.long),
                             match="prompts are empty")


def test_specpc_padding_mistakes(draft):
    specpc = hs.SpecPCPreprocessor(draft, **SPECPC)
    ids, mask = random_batch(2, 20, [0, 0], seed=5)
    right = mask.clone()
    right[1, -3:] = 0
    refused_before_the_draft(draft, specpc, ids, right, match="right-padded")
    holes = mask.clone()
    holes[1, 5:8] = 0
    refused_before_the_draft(draft, specpc, ids, holes, match="padding between tokens")
    refused_before_the_draft(draft, specpc, ids, mask * 2, match="only 0 .padding. and 1")
    refused_before_the_draft(draft, specpc, ids, mask[:, 1:], match="shape of `input_ids`")
    refused_before_the_draft(draft, specpc, ids.float(), mask, error=TypeError, match="integer token ids")


def test_specpc_protected_masks_and_ids(draft):
    """Before: a protected mask of the wrong shape was noticed only after the draft ran."""
    specpc = hs.SpecPCPreprocessor(draft, **SPECPC)
    ids, mask = random_batch(2, 20, [0, 3], seed=6)
    refused_before_the_draft(draft, specpc, ids, mask, protected_mask=torch.ones(2, 19, dtype=torch.bool),
                             match="`protected_mask` must be a tensor with the shape")
    refused_before_the_draft(draft, specpc, ids, mask, protected_mask=torch.full((2, 20), 3),
                             match="must be boolean")
    with pytest.raises(TypeError, match="sequence of token ids"):  # refused when assigned, before any call
        specpc.config.protected_token_ids = "w5"
    with pytest.raises(TypeError, match="integer token ids"):
        specpc.config.protected_token_ids = [5, "w5"]
    ids[:, 15] = 7
    specpc.config.protected_token_ids = None  # none protected, as with ()
    assert specpc(ids, mask).kept_lengths.tolist() == [12, 12]
    specpc.config.protected_token_ids = 7  # one id
    first = specpc(ids, mask)
    specpc.config.protected_token_ids = (7,)
    second = specpc(ids, mask)
    assert all(torch.equal(a, b) for a, b in zip(first.kept_indices, second.kept_indices))
    assert 15 in first.kept_indices[0].tolist() and 12 in first.kept_indices[1].tolist()
    protected_01 = torch.zeros(2, 20, dtype=torch.long)
    protected_01[0, 2] = 1
    assert 2 in specpc(ids, mask, protected_mask=protected_01).kept_indices[0].tolist()


def test_specpc_config_edited_after_construction(draft):
    specpc = hs.SpecPCPreprocessor(draft, **SPECPC)
    ids, mask = random_batch(1, 20, [0], seed=7)
    specpc.config.max_capacity_prompt = 0
    refused_before_the_draft(draft, specpc, ids, mask, match="max_capacity_prompt")
    specpc.config.max_capacity_prompt = 12
    specpc.config.starting_layer_index = 5
    refused_before_the_draft(draft, specpc, ids, mask, match="number of layers")


def test_controls_and_specpc_construction(draft):
    with pytest.raises(ValueError, match="needs `draft=`"):
        hs.SpecPCPreprocessor(None, **SPECPC)
    recency = hs.RecencyPreprocessor(max_capacity_prompt=4)
    assert recency.draft is None and isinstance(recency, hs.SpecPCPreprocessor)
    assert recency.config.window_size == 1 and recency.tokenizer is None
    ids, mask = random_batch(1, 10, [2], seed=8)
    assert recency(ids, mask).kept_indices[0].tolist() == [4, 5, 6, 7]
    with pytest.raises(ValueError, match="all padding"):
        hs.RandomPreprocessor(max_capacity_prompt=4, window_size=2)(ids, torch.zeros_like(mask))
    with pytest.raises(TypeError, match="SpecPCConfig"):
        hs.SpecPCPreprocessor(draft, config={"max_capacity_prompt": 4})


@settings(max_examples=80, deadline=None)
@given(masks=st.lists(st.lists(st.integers(0, 1), min_size=4, max_size=4), min_size=1, max_size=3))
def test_a_mask_is_accepted_exactly_when_every_row_is_left_padded_and_not_empty(masks):
    """Accepted iff every row is zeros then ones, with at least one one; the refusal names the mistake."""
    mask = torch.tensor(masks)
    ids = torch.arange(3, 3 + mask.numel()).reshape(mask.shape) * mask
    rows_ok = [row.count(1) > 0 and row == sorted(row) for row in masks]
    recency = hs.RecencyPreprocessor(max_capacity_prompt=2)
    if all(rows_ok):
        assert recency(ids, mask).kept_lengths.tolist() == [min(2, row.count(1)) for row in masks]
    elif any(row.count(1) == 0 for row in masks):
        with pytest.raises(ValueError, match="all padding"):
            recency(ids, mask)
    else:
        with pytest.raises(ValueError, match="right-padded|padding between tokens"):
            recency(ids, mask)
