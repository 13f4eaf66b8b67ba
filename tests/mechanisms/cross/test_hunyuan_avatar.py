"""HunyuanVideo-Avatar's face-aware audio adapter (P004) against the official PerceiverAttentionCA written out, and the
CATALOG oracles: outside every face mask the output is x; an all-ones mask is the plain residual cross-attention;
characters with disjoint masks do not reach each other's regions; frame t reads only frame t's audio."""

import math

import torch

import attnzoo
from attnzoo.testing import assert_close

F64 = torch.float64


def _setup(**kw):
    torch.manual_seed(0)
    m = attnzoo.build("hunyuan_avatar", 16, 1, dim_head=8, characters=("alice", "bob"), **kw).double()
    with torch.no_grad():
        m.to_out.weight.normal_(0, 0.3)  # zero-initialised in the paper; random so the adapter does something
    g = torch.Generator().manual_seed(1)
    T, L, A = 3, 4, 2
    x = torch.randn(2, T * L, 16, generator=g, dtype=F64)
    audio = {n: torch.randn(2, T * A, 16, generator=g, dtype=F64) for n in ("alice", "bob")}
    return m, x, audio, T, L, A


def _official(m, audio, x, T):
    """hymm_sp/modules/audio_adapters.py PerceiverAttentionCA.forward, (b, t, aa, D) audio, (b, t, hw, D) latents."""
    a = m.norm1(audio.view(audio.shape[0], T, -1, audio.shape[-1]))
    lat = m.norm2(x.view(x.shape[0], T, -1, x.shape[-1]))
    q = m.to_q(lat)
    k, v = m.to_kv(a).chunk(2, dim=-1)
    scale = 1 / math.sqrt(math.sqrt(m.dim_head))
    w = torch.softmax((q * scale) @ (k * scale).transpose(-2, -1), dim=-1)
    return m.to_out(w @ v).view(x.shape)


def test_single_character_equals_the_official_adapter_times_its_face_mask():
    m, x, audio, T, L, A = _setup()
    face = (torch.rand(2, T * L, generator=torch.Generator().manual_seed(5)) > 0.5).to(F64)
    got = m(x, {"alice": audio["alice"]}, region_masks={"alice": face}, num_frames=T)
    assert_close(got, x + face[..., None] * _official(m, audio["alice"], x, T), F64, "x + M * adapter")
    ones = m(x, audio["alice"], num_frames=T)  # no mask: everywhere
    assert_close(ones, x + _official(m, audio["alice"], x, T), F64, "all-ones mask")


def test_outside_faces_unchanged_disjoint_characters_and_frame_alignment():
    m, x, audio, T, L, A = _setup()
    alice = torch.zeros(2, T * L, dtype=torch.bool)
    alice[:, 0::4] = True
    bob = torch.zeros(2, T * L, dtype=torch.bool)
    bob[:, 1::4] = True
    faces = {"alice": alice, "bob": bob}
    out = m(x, audio, region_masks=faces, num_frames=T)
    outside = ~(alice | bob)
    assert torch.equal(out[outside], x[outside])
    moved = dict(audio, bob=audio["bob"] + 3 * torch.randn_like(audio["bob"]))
    out2 = m(x, moved, region_masks=faces, num_frames=T)
    assert_close(out2[alice], out[alice], F64, "alice's face ignores bob's audio")
    assert (out2[bob] - out[bob]).abs().max() > 1e-4
    frame1 = dict(audio, alice=audio["alice"].clone())
    frame1["alice"][:, A:2 * A] += 3 * torch.randn(2, A, 16, dtype=F64)  # frame 1 only
    out3 = m(x, frame1, region_masks=faces, num_frames=T)
    changed = (out3 - out).abs().amax(-1) > 1e-9  # (B, T L)
    assert changed[:, L:2 * L].any() and not changed[:, :L].any() and not changed[:, 2 * L:].any()
    whole = m(x, audio, region_masks=faces, num_frames=1)  # without frame alignment: another result
    assert (whole - out).abs().max() > 1e-4
