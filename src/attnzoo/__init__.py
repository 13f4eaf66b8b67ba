"""attnzoo: attention mechanisms from the research literature behind one contract.

    import attnzoo
    out = attnzoo.attention(q, k, v, mechanism="sliding_window", causal=True, window=256)
    layer = attnzoo.build("softmax", dim=512, heads=8, kv_heads=2, causal=True)

See ``attnzoo list`` for the registered mechanisms and ARCHITECTURE.md for the contract.
"""

# The subpackage attnzoo.mechanisms must be loaded before the registry function of the same name is bound
# below: importing a submodule for the first time sets it as an attribute of its parent package, which
# would otherwise replace the function attnzoo.mechanisms() as soon as any mechanism file is imported.
from . import mechanisms as _mechanisms_package  # noqa: F401  (isort: keep first)
from .errors import AttnzooError, OptionError, UnknownMechanismError, UnsupportedPatternError
from .functional import attention, pattern_of
from .layers import Attention, build
from .reference import softmax_attention
from .registry import PATTERNS, Mechanism, Option, get, mechanisms, names, register

__version__ = "0.1.0"

__all__ = [
    "attention", "build", "Attention", "softmax_attention", "pattern_of", "get", "mechanisms", "names",
    "register", "Mechanism", "Option", "PATTERNS", "AttnzooError", "OptionError", "UnknownMechanismError",
    "UnsupportedPatternError", "__version__",
]
