"""How a sequence is split over the ranks of a group: contiguous shards or zig-zag pairs, padded to equal size.

CATALOG P025 (sharded attention). Every layout of :mod:`attnzoo.distributed` works on explicit *global
positions*: rank ``r`` holds the tokens at ``Sharding.positions(r)`` of the (padded) sequence, so masks are
evaluated at the positions the single-process run would use, whatever the layout.

- ``"contiguous"``: rank r holds positions ``[r n, (r + 1) n)``, ``n = ceil(N / W)``. LASP-2 and the halo
  exchange need it (a rank's tokens are one stretch of the sequence).
- ``"zigzag"``: the sequence is cut into 2W chunks of ``c = ceil(N / 2W)``; rank r holds chunks ``r`` and
  ``2W - 1 - r``, so that under a causal mask every rank has the same amount of work (rank 0's early chunk
  sees little, its late chunk sees almost everything). Ring attention balances with it.
- ``ulysses = U > 1`` (the hybrid ring x Ulysses layout): the ``W / U`` ring ranks split the sequence as
  above, and each ring rank's tokens are split again over the U members of its Ulysses group (global rank
  ``g = i U + u``: ring index i, Ulysses index u), so that the Ulysses all-to-all gathers exactly ring rank
  i's tokens.

Padding: a length N that does not divide evenly is padded at the end of the global sequence; the pad slots
get positions ``N, N + 1, ...`` (unique, >= N). Padded keys are never attended, padded queries return zeros
and send no gradient; :meth:`Sharding.shard` fills them with zeros and :meth:`Sharding.unshard` drops them.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import check_choice, check_int

__all__ = ["SCHEMES", "Sharding"]

SCHEMES = ("contiguous", "zigzag")


@dataclass(frozen=True)
class Sharding:
    """The split of a sequence of ``seq_len`` tokens over ``world`` ranks (see the module docstring)."""

    seq_len: int
    world: int
    scheme: str = "contiguous"
    ulysses: int = 1

    def __post_init__(self) -> None:
        check_int("seq_len", self.seq_len, low=1)
        check_int("world", self.world, low=1)
        check_choice("sharding", self.scheme, SCHEMES)
        check_int("ulysses", self.ulysses, low=1)
        if self.world % self.ulysses:
            raise ValueError(f"ulysses: the Ulysses group size must divide the world size {self.world}, "
                             f"got {self.ulysses}")

    # -- sizes -----------------------------------------------------------------------------------------
    @property
    def ring(self) -> int:
        """Ranks along the ring (the world size divided by the Ulysses group size)."""
        return self.world // self.ulysses

    @property
    def piece(self) -> int:
        """Tokens of one contiguous piece: a whole shard (contiguous) or half of one (zig-zag)."""
        chunks = self.world * (2 if self.scheme == "zigzag" else 1)
        return -(-self.seq_len // chunks)

    @property
    def local_len(self) -> int:
        """Tokens every rank holds (padding included)."""
        return self.piece * (2 if self.scheme == "zigzag" else 1)

    @property
    def padded_len(self) -> int:
        return self.local_len * self.world

    # -- positions -------------------------------------------------------------------------------------
    def positions(self, rank: int) -> torch.Tensor:
        """(local_len,) int64 global positions of rank ``rank``'s tokens; >= seq_len marks padding."""
        check_int("rank", rank, low=0, high=self.world - 1)
        s, U = self.piece, self.ulysses
        i, u = divmod(rank, U)
        if self.scheme == "contiguous":
            start = (i * U + u) * s
            return torch.arange(start, start + s)
        c = U * s  # one zig-zag chunk of ring rank i, split over its U Ulysses members
        first = i * c + u * s
        second = (2 * self.ring - 1 - i) * c + u * s
        return torch.cat([torch.arange(first, first + s), torch.arange(second, second + s)])

    def all_positions(self) -> list[torch.Tensor]:
        return [self.positions(r) for r in range(self.world)]

    def valid(self, rank: int) -> torch.Tensor:
        """(local_len,) bool: True for real tokens, False for padding."""
        return self.positions(rank) < self.seq_len

    def is_contiguous(self) -> bool:
        """Every rank holds one stretch of the sequence, in rank order."""
        return self.scheme == "contiguous" or self.world == 1

    # -- moving tensors --------------------------------------------------------------------------------
    def shard(self, x: torch.Tensor, rank: int, dim: int = 2) -> torch.Tensor:
        """Rank ``rank``'s tokens of the full sequence ``x`` (``seq_len`` along ``dim``), zero-padded."""
        if x.shape[dim] != self.seq_len:
            raise ValueError(f"x: expected {self.seq_len} tokens along dim {dim} (the sharding's seq_len), "
                             f"got shape {tuple(x.shape)}")
        pos = self.positions(rank)
        real = pos < self.seq_len
        out = x.index_select(dim, pos.clamp(max=self.seq_len - 1).to(x.device))
        if not bool(real.all()):
            shape = [1] * x.dim()
            shape[dim] = pos.numel()
            keep = real.to(x.device).view(shape)
            if x.dtype == torch.bool:
                out = out & keep
            else:
                out = out * keep.to(out.dtype)
        return out

    def unshard(self, shards: list[torch.Tensor] | torch.Tensor, dim: int = 2) -> torch.Tensor:
        """The full sequence (``seq_len`` along ``dim``) from every rank's shard (a list in rank order, or
        their stack along a new leading axis); padding is dropped."""
        if isinstance(shards, torch.Tensor):
            shards = list(shards.unbind(0))
        if len(shards) != self.world:
            raise ValueError(f"shards: expected one shard per rank ({self.world}), got {len(shards)}")
        cat = torch.cat(shards, dim=dim)
        order = torch.argsort(torch.cat(self.all_positions()))
        return cat.index_select(dim, order[: self.seq_len].to(cat.device))
