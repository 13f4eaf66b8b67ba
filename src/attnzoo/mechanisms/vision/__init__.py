"""Vision attention modules: channel and spatial attention of CNNs on (B, C, H, W) maps (ECA, ULSAM, GhostNetV2
DFC, DANet PAM/CAM, MANIQA TAB/SSTB, EMOv2 i2RMB), plus ARM-Net's sparse attention over fields.

Every CNN module here takes (B, C, H, W) maps and, built with ``channels_last=True``, (B, H, W, C) maps with equal
results; a (B, C, H, W) tensor in ``torch.channels_last`` memory format works unchanged.
"""
