"""hf_specapprox: draft-based approximate inference (SpecKV, SpecPC, SpecKV-PC; arXiv 2506.08373) for transformers."""

from .kv.baselines import SnapKVCache, StreamingLLMCache
from .kv.binding import bind, is_bound, unbind
from .cascade import SpecKVPC
from .kv.cache import CacheInUseError, KVCompressionCache, UnboundCacheError
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

#: Public names renamed in 0.2, kept for one minor version: old name -> (new name, the new object).
_RENAMED = {"PromptCompressionCache": ("KVCompressionCache", KVCompressionCache)}


def __getattr__(name: str):
    if name in _RENAMED:
        import warnings

        new, value = _RENAMED[name]
        warnings.warn(f"`hf_specapprox.{name}` is renamed `hf_specapprox.{new}`; the old name will be removed in the "
                      "next minor version.", FutureWarning, stacklevel=2)
        return value
    raise AttributeError(f"module 'hf_specapprox' has no attribute {name!r}")

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
    "KVCompressionCache",
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
