"""Head-level mechanisms: head routing and gating, mixtures of attention experts, GQA generalisations,
cross-layer sharing of attention matrices, single-head designs and attention-aware routers (CATALOG family 3).

- ``moh`` (P006): Mixture-of-Head attention, each token runs only the heads its router picks.
- ``bam`` (P012): soft (or top-k) mixture of full attention experts, optionally sharing keys/values.
- ``shvit`` (P073): single-head attention on a fraction of the channels (vision, (B, C, H, W)).
- ``sigma_diffqkv`` (P116): different numbers of key and value heads, augmented queries, a smaller K cache.
- ``echoatt`` (P125): later layers of a group reuse the first layer's attention matrix.
- ``lama`` (P008): low-rank factorised multi-head attention pooling with a global context query.
- ``attention_aware_smoe`` (P033): MoE routing mixed over tokens by the attention (or similarity) matrix.

``_routing`` holds what they share: top-k masks, the load-balancing loss, and attention for a gathered
subset of query rows (the compute saving of routed heads and experts).
"""
