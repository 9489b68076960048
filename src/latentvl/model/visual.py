"""What a question image adds to the text model besides its merged features at the image tokens.

Qwen2.5-VL places the merged visual features at the image tokens and nothing else. Qwen3-VL also adds
DeepStack features (one ``[N, H]`` tensor per early decoder layer) to the hidden states at the visual
positions after those layers. :class:`VisualStack` carries them beside the input embeddings through
every call that takes embeddings instead of pixels (pass 1's prefix, pass 2, the stop targets'
calls, generation's prefill), and follows the rows and columns those calls select.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class VisualStack:
    """DeepStack features of a batch ``[B, S]``.

    ``index`` ``[B, S]`` long: at a visual position, the row of ``features`` that belongs there; -1
    elsewhere. ``features``: one ``[N, H]`` tensor per DeepStack layer (``N`` visual positions of the
    batch, in row-major order of the positions they were computed for). Selecting rows or columns
    moves ``index`` only; ``features`` are shared.
    """

    index: torch.Tensor
    features: list[torch.Tensor]

    @classmethod
    def from_mask(cls, mask: torch.Tensor, features: list[torch.Tensor]) -> VisualStack:
        """From ``mask`` ``[B, S]`` bool (the visual positions, row-major as ``features`` are ordered)."""
        index = torch.full(mask.shape, -1, dtype=torch.long, device=mask.device)
        index[mask] = torch.arange(int(mask.sum()), device=mask.device)
        return cls(index=index, features=list(features))

    @property
    def mask(self) -> torch.Tensor:
        """``[B, S]`` bool: the visual positions."""
        return self.index >= 0

    def take(self, rows: torch.Tensor, cols: torch.Tensor | None = None,
             valid: torch.Tensor | None = None) -> VisualStack:
        """The stack of a new batch whose row ``r`` column ``c`` is this batch's ``(rows[r], cols[r, c])``
        (``rows`` ``[R]``; ``cols`` ``[R, W]``, all columns when None); ``valid`` ``[R, W]`` False marks a
        position outside the original batch (not visual)."""
        index = self.index[rows] if cols is None else self.index[rows[:, None], cols]
        if valid is not None:
            index = torch.where(valid, index, -1)
        return VisualStack(index=index, features=self.features)

    def columns(self, start: int, end: int) -> VisualStack:
        """Columns ``[start, end)`` of every row."""
        return VisualStack(index=self.index[:, start:end], features=self.features)

    def pad_right(self, extra: int) -> VisualStack:
        """``extra`` more columns on the right, none of them visual."""
        return VisualStack(index=torch.nn.functional.pad(self.index, (0, extra), value=-1), features=self.features)

    def text_model_inputs(self) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """``(visual_pos_masks [B, S] bool, one [n, H] tensor per layer)`` in this batch's row-major order,
        as a DeepStack text model takes them."""
        mask = self.mask
        rows = self.index[mask]
        return mask, [f[rows] for f in self.features]


__all__ = ["VisualStack"]
