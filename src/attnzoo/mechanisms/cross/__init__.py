"""Cross-attention and multimodal fusion (CATALOG family "cross-attention/fusion"), on the multi-source contract of
:mod:`attnzoo.cross` (``cross_attention``, ``CrossAttention``, ``LatentResampler``, ``ContextCache``), and the
modality masks of multimodal decoders.

- ``cross_attention``: the generic multi-source layer (separate / joint, causal by position, cached context).
- ``ip_adapter``: IP-Adapter decoupled cross-attention (P069); ``freeedit_drra``: FreeEdit's decoupled residual
  reference attention (P005), the same path beside a self-attention.
- ``crossvit``: CrossViT CLS-token cross-attention fusion (P060).
- ``dcal_glca`` / ``dcal_pwca``: DCAL global-local and pair-wise cross-attention (P058).
- ``video_ccam``: Video-CCAM causal cross-attention projector (P076), frame-append decoding.
- ``acmil``: ACMIL multiple-branch gated attention pooling with stochastic top-K masking (P013).
- ``fcaformer``: FcaFormer forward cross attention to earlier blocks' tokens (P071).
- ``filip``: FILIP token-wise late interaction (P059).
- ``multilayer_pooling``: trainable latent pooling over the hidden states of all layers (P124).
- ``label_attention`` (KeNet, P018) and ``crosstune`` (CrossTune, P068): labels as queries.
- ``texthawk_resa``: TextHawk's resampling + rearrangement with multi-level cross-attention (P091).
- Modality masks of a multimodal decoder (``attnzoo.masks`` predicates, KV-cache decoding): ``croc`` (P092,
  bidirectional visual span), ``ee_mllm`` (P049, composite attention), ``aki`` (P086, modality-mutual attention).
"""
