"""hf_specapprox: draft-based approximate inference (SpecKV, SpecPC, SpecKV-PC; arXiv 2506.08373) for transformers."""

from .baselines import SnapKVCache, StreamingLLMCache
from .binding import bind, is_bound, unbind
from .cache import CompressedKVLayer, PromptCompressionCache, UnboundCacheError
from .config import KVSelectionConfig, SnapKVConfig, SpecKVConfig, SpecPCConfig, StreamingLLMConfig
from .speckv import SpecKVCache
from .specpc import SpecPCOutput, SpecPCPreprocessor

__version__ = "0.1.0"

__all__ = [
    "CompressedKVLayer",
    "KVSelectionConfig",
    "PromptCompressionCache",
    "SnapKVCache",
    "SnapKVConfig",
    "SpecKVCache",
    "SpecKVConfig",
    "SpecPCConfig",
    "SpecPCOutput",
    "SpecPCPreprocessor",
    "StreamingLLMCache",
    "StreamingLLMConfig",
    "UnboundCacheError",
    "bind",
    "is_bound",
    "unbind",
]
