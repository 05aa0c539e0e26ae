# Copyright 2026 The HuggingFace Team. All rights reserved.
#
# Licensed under the Apache License, Version 2.0 (the "License");
# you may not use this file except in compliance with the License.
# You may obtain a copy of the License at
#
#     http://www.apache.org/licenses/LICENSE-2.0
#
# Unless required by applicable law or agreed to in writing, software
# distributed under the License is distributed on an "AS IS" BASIS,
# WITHOUT WARRANTIES OR CONDITIONS OF ANY KIND, either express or implied.
# See the License for the specific language governing permissions and
# limitations under the License.
"""Tests for `Cache.prepare_prefill`, which `generate` calls once per call with the full prompt before the prefill."""

import unittest

from transformers import is_torch_available
from transformers.testing_utils import require_torch, torch_device


if is_torch_available():
    import torch

    from transformers import DynamicCache, GenerationConfig, LlamaConfig, LlamaForCausalLM
    from transformers.cache_utils import Cache

    class RecordingCache(DynamicCache):
        """A `DynamicCache` that records every `prepare_prefill` call and does nothing else."""

        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.prepare_prefill_calls = []

        def prepare_prefill(self, model, input_ids, model_kwargs, generation_config):
            self.prepare_prefill_calls.append(
                {
                    "model": model,
                    "input_ids": input_ids.clone(),
                    "attention_mask": model_kwargs.get("attention_mask"),
                    "generation_config": generation_config,
                    "seq_length": self.get_seq_length(),
                }
            )

    class PrefillingCache(RecordingCache):
        """Fills itself in `prepare_prefill` with a backbone forward over all but the last prompt token, so that the
        prefill of `generate` only feeds the last one. It stores everything, so `generate` must not change."""

        def prepare_prefill(self, model, input_ids, model_kwargs, generation_config):
            super().prepare_prefill(model, input_ids, model_kwargs, generation_config)
            if self.get_seq_length() > 0:  # a continuation: the cache already holds the start of the ids
                return
            attention_mask = model_kwargs.get("attention_mask")
            position_ids = model_kwargs.get("position_ids")
            model.model(
                input_ids=input_ids[:, :-1],
                attention_mask=attention_mask[:, :-1] if attention_mask is not None else None,
                position_ids=position_ids[:, :-1] if position_ids is not None else None,
                cache=self,
                use_cache=True,
            )


@require_torch
class CachePreparePrefillTest(unittest.TestCase):
    def setUp(self):
        torch.manual_seed(0)
        config = LlamaConfig(
            vocab_size=99,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=256,
            pad_token_id=0,
            bos_token_id=1,
            eos_token_id=2,
        )
        self.model = LlamaForCausalLM(config).to(torch_device).eval()
        self.assistant = LlamaForCausalLM(LlamaConfig(**{**config.to_dict(), "num_hidden_layers": 1}))
        self.assistant = self.assistant.to(torch_device).eval()
        self.input_ids = torch.randint(3, 99, (2, 17), device=torch_device)
        self.attention_mask = torch.ones_like(self.input_ids)
        self.attention_mask[1, :4] = 0  # left padding
        self.generate_kwargs = {"max_new_tokens": 6, "do_sample": False, "pad_token_id": 0, "eos_token_id": None}

    def _generate(self, cache=None, **kwargs):
        inputs = {"input_ids": self.input_ids, "attention_mask": self.attention_mask}
        inputs.update(kwargs.pop("inputs", {}))
        if cache is not None:
            kwargs["cache"] = cache
        return self.model.generate(**inputs, **{**self.generate_kwargs, **kwargs})

    def _assert_same_output(self, actual, expected):
        self.assertTrue(torch.equal(actual.sequences, expected.sequences))
        torch.testing.assert_close(torch.stack(actual.logits), torch.stack(expected.logits), rtol=0, atol=1e-5)

    def test_default_does_nothing(self):
        self.assertIn("prepare_prefill", vars(Cache))
        cache = DynamicCache(config=self.model.config)
        self.assertIsNone(
            cache.prepare_prefill(self.model, self.input_ids, {"attention_mask": self.attention_mask}, None)
        )
        self.assertEqual(cache.get_seq_length(), 0)
        output = self._generate(cache=cache, return_dict_in_generate=True, output_logits=True)
        self._assert_same_output(output, self._generate(return_dict_in_generate=True, output_logits=True))

    def test_called_once_per_generate_call_with_the_full_prompt(self):
        cache = RecordingCache(config=self.model.config)
        first = self._generate(cache=cache)
        self.assertEqual(len(cache.prepare_prefill_calls), 1)
        call = cache.prepare_prefill_calls[0]
        self.assertIs(call["model"], self.model)
        self.assertTrue(torch.equal(call["input_ids"], self.input_ids))
        self.assertTrue(torch.equal(call["attention_mask"], self.attention_mask))
        self.assertIsInstance(call["generation_config"], GenerationConfig)
        self.assertEqual(call["seq_length"], 0)  # before the prefill

        # A second call continuing the first: one more call, with the full ids, on the filled cache
        continuation_mask = torch.cat([self.attention_mask, torch.ones_like(first[:, self.input_ids.shape[1] :])], -1)
        self._generate(cache=cache, inputs={"input_ids": first, "attention_mask": continuation_mask})
        self.assertEqual(len(cache.prepare_prefill_calls), 2)
        self.assertTrue(torch.equal(cache.prepare_prefill_calls[1]["input_ids"], first))
        self.assertEqual(cache.prepare_prefill_calls[1]["seq_length"], first.shape[1] - 1)

    def test_called_once_with_chunked_prefill(self):
        cache = RecordingCache(config=self.model.config)
        self._generate(cache=cache, prefill_chunk_size=4)
        self.assertEqual(len(cache.prepare_prefill_calls), 1)
        self.assertTrue(torch.equal(cache.prepare_prefill_calls[0]["input_ids"], self.input_ids))

    def test_prefilling_cache_greedy_matches_stock_generate(self):
        expected = self._generate(return_dict_in_generate=True, output_logits=True)
        cache = PrefillingCache(config=self.model.config)
        actual = self._generate(cache=cache, return_dict_in_generate=True, output_logits=True)
        self._assert_same_output(actual, expected)
        self.assertEqual(len(cache.prepare_prefill_calls), 1)

    def test_prefilling_cache_without_padding_matches_stock_generate(self):
        inputs = {"input_ids": self.input_ids[:1], "attention_mask": torch.ones_like(self.input_ids[:1])}
        expected = self._generate(inputs=inputs, return_dict_in_generate=True, output_logits=True)
        cache = PrefillingCache(config=self.model.config)
        actual = self._generate(cache=cache, inputs=inputs, return_dict_in_generate=True, output_logits=True)
        self._assert_same_output(actual, expected)
        self.assertIsNone(cache.prepare_prefill_calls[0]["attention_mask"])  # `generate` drops an all-ones mask

    def test_prefilling_cache_sampling_matches_stock_generate(self):
        torch.manual_seed(1)
        expected = self._generate(do_sample=True, top_k=10)
        torch.manual_seed(1)
        actual = self._generate(cache=PrefillingCache(config=self.model.config), do_sample=True, top_k=10)
        self.assertTrue(torch.equal(actual, expected))

    def test_prefilling_cache_beam_search_matches_stock_generate(self):
        kwargs = {"num_beams": 3, "num_return_sequences": 2, "return_dict_in_generate": True, "output_scores": True}
        expected = self._generate(**kwargs)
        cache = PrefillingCache(config=self.model.config)
        actual = self._generate(cache=cache, **kwargs)
        self.assertTrue(torch.equal(actual.sequences, expected.sequences))
        torch.testing.assert_close(actual.sequences_scores, expected.sequences_scores, rtol=0, atol=1e-5)
        # The hook sees the prompt already expanded for the beams
        self.assertEqual(len(cache.prepare_prefill_calls), 1)
        self.assertTrue(
            torch.equal(cache.prepare_prefill_calls[0]["input_ids"], self.input_ids.repeat_interleave(3, dim=0))
        )

    def test_prefilling_cache_chunked_prefill_matches_stock_generate(self):
        expected = self._generate(return_dict_in_generate=True, output_logits=True)
        cache = PrefillingCache(config=self.model.config)
        actual = self._generate(cache=cache, prefill_chunk_size=4, return_dict_in_generate=True, output_logits=True)
        self._assert_same_output(actual, expected)
        self.assertEqual(len(cache.prepare_prefill_calls), 1)

    def test_prefilling_cache_continuation_matches_stock_generate(self):
        def two_calls(cache_class):
            cache = cache_class(config=self.model.config)
            first = self._generate(cache=cache)
            mask = torch.cat([self.attention_mask, torch.ones_like(first[:, self.input_ids.shape[1] :])], -1)
            return self._generate(
                cache=cache,
                inputs={"input_ids": first, "attention_mask": mask},
                return_dict_in_generate=True,
                output_logits=True,
            )

        self._assert_same_output(two_calls(PrefillingCache), two_calls(DynamicCache))

    def test_prefilling_cache_assisted_decoding_matches_stock_generate(self):
        inputs = {"input_ids": self.input_ids[1:, 4:], "attention_mask": self.attention_mask[1:, 4:]}
        for assistance in ({"assistant_model": self.assistant}, {"prompt_lookup_num_tokens": 3}):
            with self.subTest(**{key: type(value).__name__ for key, value in assistance.items()}):
                expected = self._generate(inputs=inputs, return_dict_in_generate=True, output_logits=True)
                cache = PrefillingCache(config=self.model.config)
                actual = self._generate(
                    cache=cache, inputs=inputs, return_dict_in_generate=True, output_logits=True, **assistance
                )
                self._assert_same_output(actual, expected)
                self.assertEqual(len(cache.prepare_prefill_calls), 1)
                self.assertTrue(torch.equal(cache.prepare_prefill_calls[0]["input_ids"], inputs["input_ids"]))
                self.assertEqual(cache.prepare_prefill_calls[0]["seq_length"], 0)

    def test_assisted_decoding_continues_a_cache_that_holds_part_of_the_prompt(self):
        inputs = {"input_ids": self.input_ids[:1], "attention_mask": self.attention_mask[:1]}
        expected = self._generate(inputs=inputs, return_dict_in_generate=True, output_logits=True)
        # Filled before `generate`, the hook then leaves it as it is: the first forward feeds only the last token
        cache = PrefillingCache(config=self.model.config)
        cache.prepare_prefill(self.model, inputs["input_ids"], {"attention_mask": None, "position_ids": None}, None)
        actual = self._generate(
            cache=cache, inputs=inputs, assistant_model=self.assistant, return_dict_in_generate=True, output_logits=True
        )
        self._assert_same_output(actual, expected)
