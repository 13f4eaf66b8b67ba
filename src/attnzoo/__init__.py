"""attnzoo: attention mechanisms from the research literature behind one contract.

    import attnzoo
    out = attnzoo.attention(q, k, v, mechanism="sliding_window", causal=True, window=256)
    layer = attnzoo.build("softmax", dim=512, heads=8, kv_heads=2, causal=True)
    out = attnzoo.cross_attention(q, {"text": (k_t, v_t), "image": (k_i, v_i)}, mode="separate")

See ``attnzoo list`` (or ``attnzoo.list_mechanisms()``) for the registered mechanisms and ARCHITECTURE.md
for the contract. (``attnzoo.mechanisms`` is the package holding one file per paper.)
"""

from .cross import CrossAttention, LatentResampler, cross_attention
from .errors import AttnzooError, OptionError, UnknownMechanismError, UnsupportedPatternError
from .functional import attention, pattern_of
from .layers import Attention, build
from .reference import softmax_attention
from .registry import PATTERNS, CrossSpec, Mechanism, Option, get, names, register
from .registry import mechanisms as list_mechanisms
from .state.context import ContextCache

__version__ = "0.1.0"

__all__ = [
    "attention", "build", "Attention", "softmax_attention", "cross_attention", "CrossAttention", "LatentResampler",
    "ContextCache", "CrossSpec", "pattern_of", "get", "list_mechanisms", "names",
    "register", "Mechanism", "Option", "PATTERNS", "AttnzooError", "OptionError", "UnknownMechanismError",
    "UnsupportedPatternError", "__version__",
]
