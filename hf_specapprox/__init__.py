"""hf_specapprox: draft-based approximate inference (SpecKV, SpecPC, SpecKV-PC; arXiv 2506.08373) for transformers."""

from .baselines import SnapKVCache, StreamingLLMCache
from .binding import bind, is_bound, unbind
from .cascade import SpecKVPC
from .cache import PromptCompressionCache, UnboundCacheError
from .layers import CompressedKVLayer
from .static_layers import StaticCacheOverflowError, StaticCompressedLayer
from .config import AttentionSelectionConfig, KVSelectionConfig, SnapKVConfig, SpecKVConfig, SpecPCConfig, StreamingLLMConfig
from .knorm import KeyNormScorer, KnormCache, KnormConfig
from .policies import SelectionPolicy
from .query_sources import DraftPreview, QuerySource
from .scorers import AttentionScorer, KVScorer, RecencyScorer, ScorerInputs
from .monitor import DraftAgreementMonitor
from .pipeline import SpecApproxTextGenerationPipeline
from .prompt_baselines import RandomPreprocessor, RecencyPreprocessor, SpecPrefillPreprocessor
from .serving import ServingError, SpecPCClient, SpecPCCompletion, SpecPCStream
from .speckv import SpecKVCache
from .specpc import SpecPCOutput, SpecPCPreprocessor

__version__ = "0.1.0"

__all__ = [
    "AttentionScorer",
    "AttentionSelectionConfig",
    "CompressedKVLayer",
    "DraftAgreementMonitor",
    "DraftPreview",
    "KVScorer",
    "KVSelectionConfig",
    "KeyNormScorer",
    "KnormCache",
    "KnormConfig",
    "PromptCompressionCache",
    "QuerySource",
    "RandomPreprocessor",
    "RecencyPreprocessor",
    "RecencyScorer",
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
    "UnboundCacheError",
    "bind",
    "is_bound",
    "unbind",
]
