"""Analysis tools: attention-mask plots (:mod:`attnzoo.analysis.mask_plot`) and, later, attention maps, sink,
retrieval-head and head-importance metrics on the effective attention operator of any mechanism."""
