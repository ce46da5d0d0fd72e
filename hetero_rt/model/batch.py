"""A packed batch: the tokens of several sequences one after another, each run of them a Segment
naming its cache slot and first position. `Packed` is the layout of one forward (positions, where
each segment starts, which tokens take the absorbed attention path), computed once per forward and
shared by every layer, so a decode step builds it once, not once per layer.

Legend: T tokens in the batch, Ta tokens on the absorbed path.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch


@dataclass(frozen=True)
class Segment:
    """`length` consecutive tokens of one sequence, in cache slot `slot`, at positions start.."""
    slot: int
    start: int
    length: int


class Packed:
    """absorbed=None: the absorbed MLA path for one-token segments (decode), the naive one for
    longer ones (prefill); True / False: that path for every segment."""

    def __init__(self, segments: Sequence[Segment], absorbed: bool | None, device: torch.device | str):
        self.segments = list(segments)
        self.offsets, off = [], 0
        for s in self.segments:
            self.offsets.append(off)
            off += s.length
        self.tokens = off
        self.absorb = [s.length == 1 if absorbed is None else absorbed for s in self.segments]
        self.positions = torch.cat([torch.arange(s.start, s.start + s.length) for s in self.segments]).to(device)  # (T,)
        rows = [torch.arange(o, o + s.length) for o, s, a in zip(self.offsets, self.segments, self.absorb) if a]
        self.absorbed_rows = torch.cat(rows).to(device) if rows else None                                     # (Ta,)
        self.last_rows = torch.tensor([o + s.length - 1 for o, s in zip(self.offsets, self.segments)]).to(device)

    @property
    def all_absorbed(self) -> bool:
        return all(self.absorb)
