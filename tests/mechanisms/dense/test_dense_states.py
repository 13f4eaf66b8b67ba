"""TokenHistoryCache and PositionState: reorder (beam search), crop (roll back), nbytes."""

import pytest
import torch

from attnzoo.mechanisms.dense._common import TokenHistoryCache
from attnzoo.mechanisms.dense.gaam import PositionState
from attnzoo.mechanisms.dense.mqsa import MultiQuerySelfAttention
from attnzoo.mechanisms.dense.rcmha import RelativeConvolutionalMHA
from attnzoo.testing import assert_close

F64 = torch.float64


def _x(b=3, n=8, dim=16, seed=0):
    return torch.randn(b, n, dim, generator=torch.Generator().manual_seed(seed), dtype=F64)


@pytest.mark.parametrize("make", [
    lambda: MultiQuerySelfAttention(16, 4, causal=True, long_window=3),
    lambda: RelativeConvolutionalMHA(16, 4, causal=True, kernel_size=3),
])
def test_reorder_then_continue_equals_decoding_the_reordered_batch(make):
    torch.manual_seed(0)
    m = make().double().eval()
    x = _x()
    idx = torch.tensor([2, 0, 0])
    st = m.init_state(3)
    m(x[:, :5], state=st)
    st.reorder(idx)
    got = torch.cat([m(x[idx, t : t + 1], state=st)[0] for t in range(5, 8)], 1)
    want = m(torch.cat([x[idx, :5], x[idx, 5:]], 1))[:, 5:]
    assert_close(got, want, F64, "after reorder")
    assert st.batch == 3 and st.history.shape[0] == 3


def test_crop_rolls_back_with_extra_and_refuses_without():
    torch.manual_seed(1)
    m = RelativeConvolutionalMHA(16, 4, causal=True, kernel_size=3).double().eval()
    x, y = _x(), _x(seed=1)
    st = TokenHistoryCache(3, 4, 4, 4, features=48, keep=2, extra=2, dtype=F64)
    m(x[:, :6], state=st)
    st.crop(4)  # speculative tokens 4, 5 rejected
    got = torch.cat([m(y[:, t : t + 1], state=st)[0] for t in range(4, 8)], 1)
    want = m(torch.cat([x[:, :4], y[:, 4:8]], 1))[:, 4:]
    assert_close(got, want, F64, "after crop")
    tight = m.init_state(3)  # extra = 0: cannot roll back
    m(x[:, :6], state=tight)
    with pytest.raises(ValueError, match="crop"):
        tight.crop(5)
    assert st.nbytes() > 0


def test_position_state():
    st = PositionState(2)
    st.advance(5)
    st.crop(3)
    assert st.seq_len == 3
    st.reorder(torch.tensor([1, 1, 0]))
    assert st.batch == 3
    with pytest.raises(ValueError, match="length"):
        st.crop(4)
    with pytest.raises(ValueError, match="index"):
        st.reorder(torch.tensor([3]))
