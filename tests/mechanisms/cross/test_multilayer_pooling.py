"""Multi-layer trainable pooling (P124): parity with the official PerceiverResampler (yixuantt/PoolingAndAttn
pooling_layers/MultiLayersTrainablePooling.py, written out below) on copied weights; one layer is last-token pooling;
the memory helper reads a Hugging Face hidden-states tuple."""

import torch
import torch.nn.functional as F
from torch import nn

from attnzoo.mechanisms.cross.multilayer_pooling import MultiLayerTrainablePooling, hidden_states_memory
from attnzoo.testing import assert_close

F64 = torch.float64


class OfficialPerceiverResampler(nn.Module):
    """The official module's computation (PreNorm, Attention with to_q on the latents and to_kv on the hiddens,
    GEGLU FeedForward, mean, normalize), written out with reshapes instead of einops."""

    def __init__(self, dim, heads, dim_head, num_latents, layers):
        super().__init__()
        inner = heads * dim_head
        self.heads, self.scale = heads, dim_head ** -0.5
        self.latents = nn.Parameter(torch.randn(num_latents, dim))
        self.pos_emb = nn.Embedding(layers, dim)
        self.norm = nn.LayerNorm(dim)  # PreNorm.norm: applied to the hiddens (its first argument)
        self.norm_context = nn.LayerNorm(dim)  # PreNorm.norm_context: applied to the latents
        self.to_q = nn.Linear(dim, inner, bias=False)
        self.to_kv = nn.Linear(dim, 2 * inner, bias=False)
        self.to_out = nn.Linear(inner, dim, bias=False)
        self.ff_norm = nn.LayerNorm(dim)
        self.ff = nn.Sequential(nn.Linear(dim, dim * 4 * 2), nn.Identity(), nn.Linear(dim * 4, dim))

    def forward(self, hiddens):
        B, L, _ = hiddens.shape
        hiddens = hiddens + self.pos_emb(torch.arange(L))
        x = self.latents.unsqueeze(0).expand(B, -1, -1)
        h, c = self.norm(hiddens), self.norm_context(x)
        q = self.to_q(c)
        k, v = self.to_kv(h).chunk(2, dim=-1)

        def split(t):
            return t.view(B, -1, self.heads, t.shape[-1] // self.heads).transpose(1, 2)

        out = F.scaled_dot_product_attention(split(q), split(k), split(v))
        x = self.to_out(out.transpose(1, 2).reshape(B, -1, q.shape[-1])) + x
        y = self.ff[0](self.ff_norm(x))
        a, gates = y.chunk(2, dim=-1)
        x = self.ff[2](a * F.gelu(gates)) + x
        return F.normalize(x.mean(dim=1), p=2, dim=-1)


def test_parity_with_the_official_perceiver_resampler():
    torch.manual_seed(0)
    dim, heads, dh, nl, layers = 16, 2, 12, 5, 7
    off = OfficialPerceiverResampler(dim, heads, dh, nl, layers).double()
    for ln in (off.norm, off.norm_context, off.ff_norm):
        nn.init.normal_(ln.weight, 1.0, 0.2)
        nn.init.normal_(ln.bias, 0.0, 0.2)
    ours = MultiLayerTrainablePooling(dim, heads, num_latents=nl, num_layers=layers, head_dim=dh).double()
    layer = ours.resampler.layers[0]
    with torch.no_grad():
        ours.resampler.latents.copy_(off.latents)
        ours.layer_embedding.weight.copy_(off.pos_emb.weight)
        layer.norm_c.load_state_dict(off.norm.state_dict())
        layer.norm_q.load_state_dict(off.norm_context.state_dict())
        layer.attn.q_proj.weight.copy_(off.to_q.weight)
        wk, wv = off.to_kv.weight.chunk(2, dim=0)
        layer.attn.k_proj["layer0"].weight.copy_(wk)
        layer.attn.v_proj["layer0"].weight.copy_(wv)
        layer.attn.o_proj.weight.copy_(off.to_out.weight)
        layer.norm_ff.load_state_dict(off.ff_norm.state_dict())
        layer.ff[0].load_state_dict(off.ff[0].state_dict())
        layer.ff[2].load_state_dict(off.ff[2].state_dict())
    hiddens = torch.randn(3, layers, dim, generator=torch.Generator().manual_seed(1), dtype=F64)
    assert_close(ours(hiddens), off(hiddens), F64, "official parity")
    assert_close(ours(hiddens).norm(dim=-1), torch.ones(3, dtype=F64), F64, "unit embeddings")


def test_one_layer_is_last_token_pooling():
    torch.manual_seed(0)
    m = MultiLayerTrainablePooling(8, 2, num_latents=3, num_layers=4, ff_mult=0, reduce="none").double()
    h = torch.randn(2, 1, 8, dtype=F64)  # one layer's last-token state
    z = m(h)
    layer = m.resampler.layers[0]
    mem = layer.norm_c(h + m.layer_embedding.weight[:1])
    proj = layer.attn.o_proj(layer.attn.v_proj["layer0"](mem))  # one key: every latent copies its value
    assert_close(z, m.resampler.latents + proj, F64, "single layer")


def test_hidden_states_memory_takes_layers_1_to_L_at_the_position():
    hs = tuple(torch.randn(2, 5, 4) for _ in range(4))  # embeddings + 3 layers
    mem = hidden_states_memory(hs)
    assert mem.shape == (2, 3, 4) and torch.equal(mem[:, 1], hs[2][:, -1])
