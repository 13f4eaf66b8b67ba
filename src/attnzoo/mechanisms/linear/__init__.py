"""Linear and recurrent attention: mechanisms with a parallel (quadratic-masked), a chunked and a
recurrent form that compute the same thing.

- ``linear``: causal linear attention of Katharopoulos et al. ("Transformers are RNNs", arXiv 2006.16236),
  the family's base; everything else reduces to it in a limit.
- ``lightning``: Lightning Attention-2 (decayed, unnormalised linear attention, arXiv 2401.04658).
- ``transnormer``: TransNormerLLM's gated linear attention block (module; arXiv 2307.14995).
- ``based`` / ``based_layer``: BASED's Taylor-feature linear attention and its layers (arXiv 2402.18668).
- ``agent`` / ``agent_layer``: Agent Attention, softmax through a few agent tokens (arXiv 2312.08874).
- ``aaren``: Aaren, softmax attention of a learned query as a prefix scan (arXiv 2405.13956).

The chunked algorithm shared by the first four lives in :mod:`attnzoo.kernels.chunked`; their decode state
is :class:`attnzoo.state.RecurrentState`.
"""
