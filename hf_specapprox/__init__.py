"""hf_specapprox: draft-based approximate inference (SpecKV, SpecPC, SpecKV-PC; arXiv 2506.08373) for transformers."""

from .kv.baselines import SnapKVCache, StreamingLLMCache
from .kv.binding import bind, is_bound, unbind
from .cascade import SpecKVPC
from .kv.cache import CacheInUseError, PromptCompressionCache, UnboundCacheError
from .kv.context import RetainedContext
from .kv.layers import CompressedKVLayer
from .kv.static_layers import StaticCacheOverflowError, StaticCompressedLayer
from .config import AttentionSelectionConfig, KVSelectionConfig, SnapKVConfig, SpecKVConfig, SpecPCConfig, StreamingLLMConfig
from .kv.knorm import KeyNormScorer, KnormCache, KnormConfig
from .kv.policies import SelectionPolicy
from .kv.query_sources import DraftPreview, QuerySource
from .kv.scorers import AttentionScorer, KVScorer, RecencyScorer, ScorerInputs
from .integrations.monitor import DraftAgreementMonitor
from .integrations.pipeline import SpecApproxTextGenerationPipeline
from .prompt.baselines import RandomPreprocessor, RecencyPreprocessor, SpecPrefillPreprocessor
from .integrations.serving import ServingError, SpecPCClient, SpecPCCompletion, SpecPCStream
from .kv.speckv import SpecKVCache
from .prompt.scorers import (DraftLookaheadAttention, DraftWindowAttention, RandomTokenScores, RecencyTokenScores,
                             TokenScorer, TokenScores)
from .prompt.selectors import NeighbourExpansion, TokenSelector, WholeChunks
from .prompt.specpc import SpecPCOutput, SpecPCPreprocessor

__version__ = "0.1.0"

__all__ = [
    "AttentionScorer",
    "AttentionSelectionConfig",
    "CacheInUseError",
    "CompressedKVLayer",
    "DraftAgreementMonitor",
    "DraftLookaheadAttention",
    "DraftPreview",
    "DraftWindowAttention",
    "KVScorer",
    "KVSelectionConfig",
    "KeyNormScorer",
    "KnormCache",
    "KnormConfig",
    "NeighbourExpansion",
    "PromptCompressionCache",
    "QuerySource",
    "RandomPreprocessor",
    "RandomTokenScores",
    "RecencyPreprocessor",
    "RecencyScorer",
    "RecencyTokenScores",
    "RetainedContext",
    "ScorerInputs",
    "SelectionPolicy",
    "ServingError",
    "SnapKVCache",
    "SnapKVConfig",
    "SpecApproxTextGenerationPipeline",
    "SpecKVCache",
    "SpecKVConfig",
    "SpecKVPC",
    "SpecPCClient",
    "SpecPCCompletion",
    "SpecPCConfig",
    "SpecPCOutput",
    "SpecPCPreprocessor",
    "SpecPCStream",
    "SpecPrefillPreprocessor",
    "StaticCacheOverflowError",
    "StaticCompressedLayer",
    "StreamingLLMCache",
    "StreamingLLMConfig",
    "TokenScorer",
    "TokenScores",
    "TokenSelector",
    "UnboundCacheError",
    "WholeChunks",
    "bind",
    "is_bound",
    "unbind",
]
