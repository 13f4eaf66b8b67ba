"""Cross-attention and multimodal fusion: queries attending to other streams, and the modality masks of
multimodal decoders."""
