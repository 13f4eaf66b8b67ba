"""Dense softmax variants (CATALOG family ``dense``): attention that still scores every key, with a
changed score, temperature, positional term, mask or normaliser.

One file per paper: ``rcmha`` (P007), ``gaam`` (P011), ``complexformer`` (P020), ``minimal_symmetric``
(P032), ``spectformer`` (P036, a grid token mixer), ``mqsa`` (P039), ``selective_attention`` (P079) and
``illama_soft_mask`` (P090). Helpers shared by their modules live in ``_common``.
"""
