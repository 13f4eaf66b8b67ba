"""Decode states: what a mechanism keeps between decoding steps.

Every state implements the :class:`DecodeState` protocol: ``seq_len`` (tokens seen so far),
``reorder(index)`` for beam search, ``crop(length)`` to roll back to the first ``length`` tokens
(speculative decoding, retries) and ``nbytes()``. States are updated in place by a mechanism's ``step``.

This package holds the protocol and the states several mechanisms share (the KV cache, the sliding-window and
sink+window caches, the fixed-size recurrent state), and :func:`compile_decode`, ``torch.compile`` of a
layer's one-token decode call with an eager fallback. The cross family's context cache lives with its function in
:mod:`attnzoo.cross.cache`. A state that serves one mechanism lives in that mechanism's
file (e.g. ``CCAState`` in ``attnzoo.mechanisms.memory.cca``), or in its family's ``_common.py`` when the family
shares it.
"""

from .base import DecodeState
from .compiled import CompiledDecode, StepModule, compile_decode
from .kv import KVCache, SinkWindowCache, SlidingWindowCache
from .recurrent import RecurrentState

__all__ = ["CompiledDecode", "DecodeState", "KVCache", "RecurrentState", "SinkWindowCache", "SlidingWindowCache",
           "StepModule", "compile_decode"]
