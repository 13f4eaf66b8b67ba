"""Content-adaptive sparse and approximate attention (CATALOG family 7, ``sparse``).

Each mechanism here first *selects*, from the content, which keys a query (or a block of queries) may see,
then computes exact softmax attention over the selection:

- ``biformer``: bi-level routing, region-to-region top-k on region means (arXiv 2303.08810);
- ``hyperattention``: sortLSH bucket blocks plus a sampled residual, merged by log-sum-exp (arXiv 2310.05869);
- ``hip``: hierarchical tree search for the top-k key blocks of every query block (arXiv 2406.09827);
- ``dma``: top-w keys by a per-key importance computed from the values (arXiv 2508.02124);
- ``sparsifiner``: a learned low-rank connectivity predictor and per-query top-k (arXiv 2303.13755).

Common to all: the selection (top-k indices) is not differentiable; gradients flow through the selected
scores and values exactly as in dense attention with the selected boolean mask. The ``reference`` forms
materialize that mask densely; the ``fast`` forms gather the selected keys
(:mod:`attnzoo.kernels.gather`) and never build the N x N score matrix.
"""
