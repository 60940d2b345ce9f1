"""Where every row of a vision-TOWER activation sits in the image.

The vision tower does not see the decoder's sequence: it sees a batch of processed pictures
(the image, its anyres tiles, its crops, its thumbnail), each cut into a grid of patches. A
family (``Family.tower_grids``) lists those grids per image, in the tower's batch order, with
each patch's box in ORIGINAL image pixels; ``TowerLayout`` collects them for a prepared batch and
maps an activation of any tower / projector hook to its rows (``TowerLayout.rows``):

* batched towers (``[entries, tokens, ...]``): each entry holds ``prefix + rows * cols`` tokens
  (CLIP's / InternViT's CLS first), or ``rows * cols`` (the projector's input after the CLS is
  dropped), or ``(rows / merge) * (cols / merge)`` (after the projector folds ``merge x merge``
  patches into one LM token: pixel shuffle, pooling);
* flat towers (Qwen-VL: ``[patches, ...]`` over every image of the batch): patches ordered by
  merge block (blocks row-major, the ``merge x merge`` patches of a block row-major inside it),
  or one row per block after the merger; ``blocks`` reorders the blocks for hooks that see them
  in another order (Qwen2.5-VL's window attention, undone only after the merger).

A merged row's box is the union of its patches' boxes (patches that lie wholly in padding are
left out).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from jaxtyping import Float, Int
from torch import Tensor

from corelens.data.layout import ViewGeometry
from corelens.errors import InputError

LEVELS = ("patches+prefix", "patches", "merged")


@dataclass
class TowerRows:
    """One row per row of a tower activation (entries flattened): ``entry`` indexes
    ``TowerLayout.grids``; ``row``/``col`` are the cell in that grid at ``level`` (patch or
    merged cell; ``-1`` on prefix rows such as CLS); ``boxes`` in original pixels (zeros on
    prefix rows)."""

    entry: Int[Tensor, " n"]
    row: Int[Tensor, " n"]
    col: Int[Tensor, " n"]
    boxes: Float[Tensor, "n 4"]
    level: str

    def __len__(self) -> int:
        return int(self.entry.numel())

    @property
    def is_prefix(self) -> Tensor:
        return self.row < 0


def merged_boxes(boxes: Float[Tensor, "r c 4"], k: int) -> Float[Tensor, "rk ck 4"]:
    """Union of each ``k x k`` block's boxes (rows/cols past a whole block are dropped, as a
    stride-k pooling drops them); empty boxes do not count."""
    r, c = boxes.shape[0] // k, boxes.shape[1] // k
    b = boxes[:r * k, :c * k].reshape(r, k, c, k, 4).permute(0, 2, 1, 3, 4).reshape(r, c, k * k, 4)
    empty = (b[..., 2] <= b[..., 0]) | (b[..., 3] <= b[..., 1])
    inf = torch.tensor(float("inf"), dtype=b.dtype)
    lo = torch.where(empty[..., None], inf, b[..., :2]).amin(2)
    hi = torch.where(empty[..., None], -inf, b[..., 2:]).amax(2)
    out = torch.cat([lo, hi], -1)
    return torch.where(empty.all(2)[..., None], torch.zeros_like(out), out)


def _gather(grids: list[Tensor], entry: Tensor, row: Tensor, col: Tensor) -> Tensor:
    """``grids[entry[i]][row[i], col[i]]`` for every i, in one index."""
    flat = torch.cat([g.reshape(-1, g.shape[-1]) for g in grids])
    sizes = torch.tensor([g.shape[0] * g.shape[1] for g in grids])
    offset = torch.cumsum(sizes, 0) - sizes
    width = torch.tensor([g.shape[1] for g in grids])
    return flat[offset[entry] + row * width[entry] + col]


@dataclass
class TowerLayout:
    """The tower's batch for one prepared batch: ``grids[i]`` is entry i (patch grid and boxes),
    from image ``image[i]`` of example ``example[i]``, its image's ``index[i]``-th tower view."""

    grids: list[ViewGeometry]
    example: Int[Tensor, " entries"]
    image: Int[Tensor, " entries"]
    index: Int[Tensor, " entries"]
    prefix: int = 0  # tokens before each grid (a CLS)
    merge: int = 1  # patches per side the projector folds into one LM token
    flat: bool = False  # activations are [patches, ...] over all entries (Qwen-VL)
    blocks: Int[Tensor, " blocks"] | None = None  # flat: the merge blocks' order in the rows

    def __len__(self) -> int:
        return len(self.grids)

    def _cells(self, level: str, e: int) -> tuple[Tensor, Tensor, Tensor]:
        """(row, col, box) of entry e's cells at ``level``, row-major."""
        g = self.grids[e]
        boxes = g.boxes if level != "merged" else merged_boxes(g.boxes, self.merge)
        r, c = boxes.shape[:2]
        rows = torch.arange(r).repeat_interleave(c)
        cols = torch.arange(c).repeat(r)
        return rows, cols, boxes.reshape(-1, 4)

    def _block_grid(self) -> Tensor:
        """``[blocks, 3]``: (entry, block row, block col) of every merge block, in the order the
        rows of a flat tower hold them (``blocks``; default: the processor's, row-major per
        entry)."""
        k = self.merge
        parts = []
        for e, g in enumerate(self.grids):
            br, bc = g.rows // k, g.cols // k
            rr = torch.arange(br).repeat_interleave(bc)
            cc = torch.arange(bc).repeat(br)
            parts.append(torch.stack([torch.full_like(rr, e), rr, cc], 1))
        block = torch.cat(parts)
        return block if self.blocks is None else block[self.blocks]

    def level(self, shape: torch.Size, hook_name: str = "the hook") -> str:
        """Which grid an activation of ``shape`` is laid out on (``LEVELS``)."""
        if self.flat:
            n, blocks = int(shape[0]), len(self._block_grid())
            if n == blocks * self.merge ** 2:
                return "patches"
            if n == blocks:
                return "merged"
            raise InputError(f"{hook_name} has {n} rows, which is neither the tower's "
                             f"{blocks * self.merge ** 2} patches nor its {blocks} merged "
                             "tokens; it is not a per-patch activation")
        if len(shape) < 3:
            raise InputError(f"{hook_name} gives {tuple(shape)}: not [pictures, tokens, ...], "
                             "so not a per-patch activation (e.g. a pooled output)")
        n, tokens = int(shape[0]), int(shape[1])
        if n != len(self):
            raise InputError(f"{hook_name} has {n} entries in its batch, but the tower sees "
                             f"{len(self)} pictures (tiles, crops, images) here; it is not a "
                             "per-patch tower activation")
        found = [lv for lv in LEVELS if all(self._count(lv, g) == tokens for g in self.grids)]
        if not found:
            raise InputError(
                f"{hook_name} has {tokens} tokens per picture, which is none of the tower's "
                f"grids ({self.prefix} prefix + patches, patches, or {self.merge}x{self.merge}-"
                "merged patches); it is not a per-patch activation (e.g. the pixels or a pooled "
                "output)")
        return "patches" if "patches" in found else found[0]

    def _count(self, level: str, g: ViewGeometry) -> int:
        if level == "merged":
            return (g.rows // self.merge) * (g.cols // self.merge)
        return g.rows * g.cols + (self.prefix if level == "patches+prefix" else 0)

    def rows_at(self, level: str) -> TowerRows:
        """The rows of an activation laid out on ``level``, in the activation's order."""
        if self.flat:
            return self._flat_rows(level)
        parts = []
        for e in range(len(self)):
            row, col, box = self._cells(level, e)
            if level == "patches+prefix" and self.prefix:
                pre = torch.full((self.prefix,), -1)
                row, col = torch.cat([pre, row]), torch.cat([pre, col])
                box = torch.cat([torch.zeros(self.prefix, 4, dtype=box.dtype), box])
            parts.append((torch.full_like(row, e), row, col, box))
        return TowerRows(*(torch.cat(p) for p in zip(*parts)), level=level)

    def _flat_rows(self, level: str) -> TowerRows:
        k = self.merge
        block = self._block_grid()
        if level == "patches":
            i = torch.arange(k).repeat_interleave(k)
            j = torch.arange(k).repeat(k)
            entry = block[:, 0].repeat_interleave(k * k)
            row = (block[:, 1, None] * k + i).reshape(-1)
            col = (block[:, 2, None] * k + j).reshape(-1)
            boxes = _gather([g.boxes for g in self.grids], entry, row, col)
        else:
            entry, row, col = block.unbind(1)
            boxes = _gather([merged_boxes(g.boxes, k) for g in self.grids], entry, row, col)
        return TowerRows(entry, row, col, boxes, level)

    def rows(self, shape: torch.Size, hook_name: str = "the hook") -> TowerRows:
        """The rows of an activation of ``shape`` (leading axes ``[pictures, tokens]`` or, for a
        flat tower, ``[patches]``), flattened in that order."""
        return self.rows_at(self.level(shape, hook_name))
