"""Decode states: what a mechanism keeps between decoding steps.

Every state implements the :class:`DecodeState` protocol: ``seq_len`` (tokens seen so far),
``reorder(index)`` for beam search, ``crop(length)`` to roll back to the first ``length`` tokens
(speculative decoding, retries) and ``nbytes()``. States are updated in place by a mechanism's ``step``.
"""

from .base import DecodeState
from .context import ContextCache
from .dense import PositionState, TokenHistoryCache
from .heads import DiffKVCache, EchoAttentionCache, RoutedKVCache, TokenBuffers
from .kv import KVCache, SinkWindowCache, SlidingWindowCache
from .memory import CCAState, FITState, LandmarkCache, LongHeadsState, NeuralMemoryState, RecycledState, TitansState
from .moa import PerHeadWindowCache
from .recurrent import RecurrentState
from .s2 import S2Cache

__all__ = [
    "DecodeState", "ContextCache", "KVCache", "SinkWindowCache", "SlidingWindowCache",
    "PositionState", "TokenHistoryCache",
    "DiffKVCache", "EchoAttentionCache", "RoutedKVCache", "TokenBuffers",
    "PerHeadWindowCache", "S2Cache", "RecurrentState",
    "CCAState", "FITState", "LandmarkCache", "LongHeadsState", "NeuralMemoryState", "RecycledState", "TitansState",
]
