"""Source grids: weights that still lie on the 4-bit grid of the GGUF they came from export
with the GGUF's own 4-bit values and scales, not a second rounding.

A model dequantized from a GGUF holds, per row and block of 32 inputs, either
    Q4_0  w = d * (q - 8)     q in 0..15   (symmetric: what both exporters' 4-bit formats store)
    Q4_1  w = d * q + m       q in 0..15   (affine: a zero offset per block)
`compress.load` records the GGUF's types in the config (`compress.format.SOURCE_GRID_KEY`); the grid itself is
read back from the weights, so a weight that healing or merging moved is simply off the grid
and gets the export's own rounding.

Neither backend stores Q4_1 blocks as they are: XNNPACK's 4-bit groups are symmetric, and ONNX
Runtime's MatMulNBits is 23x slower at decode with the float zero points Q4_1 needs
(benchmarks/results/matmulnbits.md). So an affine weight is split exactly into
    x W^T = x W0^T + (x E^T) C^T
where W0 = d * (q - 8) is symmetric (stored as the 4-bit values q - 8 and scales d, exactly),
E (blocks, in) sums each block of inputs (0/1; one tensor per input width, shared by every
such Linear) and C (out, blocks) holds the per-block offsets m + 8d: fp32 in ONNX (exact; 1/8
byte a weight, as MatMulNBits' blocks do not fit C's 18 or 48 columns), 8-bit per row in
ExecuTorch (1/32 byte a weight, the one rounding left, `offset_weights`; the whole dense 8da4w+emb8
export measures x1.017 of fp32, benchmarks/results/quant_exports.md).
"""

from __future__ import annotations

import torch
from torch import nn

GROUP = 32  # every GGUF block type compress.load records (Q4_0, Q4_1, Q8_0) has blocks of 32
_TOL = 1e-5  # a value is on the grid when within this fraction of its block's step


def source_grid(model) -> dict | None:
    """The GGUF block types the model was dequantized from, if it was."""
    from compress.format import SOURCE_GRID_KEY  # the folded format: the one bridge from compress/

    grid = getattr(model.config, SOURCE_GRID_KEY, None)
    return grid if isinstance(grid, dict) and grid.get("types") else None


def _blocks(w: torch.Tensor, group_size: int) -> torch.Tensor:
    return w.detach().float().reshape(w.shape[0], -1, group_size)


def _fits(w: torch.Tensor, approx: torch.Tensor, step: torch.Tensor) -> bool:
    return bool(((w - approx).abs() <= _TOL * step + 1e-30).all())


def centered_grid(w: torch.Tensor, group_size: int = GROUP) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(q int8 in [-8, 7] of w's shape, d fp32 (rows, blocks)) if w = d * q exactly in every
    block, else None: Q4_0, our split of Q4_1, and weights GPTQ or a quantization-aware cure
    put on a symmetric grid. A block's step is found from its largest magnitude, which sits
    at some |q| = k in 1..8; the largest k that fits is taken (any fitting step is exact)."""
    b = _blocks(w, group_size)
    amax = b.abs().amax(-1, keepdim=True)
    found = torch.zeros_like(amax, dtype=torch.bool)
    d = torch.ones_like(amax)  # an all-zero block: q = 0 at any step
    for k in range(8, 0, -1):
        step = amax / k
        q = torch.round(b / torch.where(step > 0, step, torch.ones_like(step)))
        fits = ((b - q * step).abs() <= _TOL * step).all(-1, keepdim=True) & (q >= -8).all(-1, keepdim=True) \
            & (q <= 7).all(-1, keepdim=True) & (amax > 0) & ~found
        d = torch.where(fits, step, d)
        found |= fits
    if not bool((found | (amax == 0)).all()):
        return None
    q = torch.round(b / d).clamp(-8, 7)
    return q.to(torch.int8).reshape(w.shape), d.squeeze(-1)


def affine_grid(w: torch.Tensor, group_size: int = GROUP) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
    """(q in 0..15, d, m) with w = d * q + m in every block of `group_size` (Q4_1), else None."""
    b = _blocks(w, group_size)
    lo, hi = b.amin(-1, keepdim=True), b.amax(-1, keepdim=True)
    d = (hi - lo) / 15
    step = torch.where(d > 0, d, torch.ones_like(d))
    q = torch.round((b - lo) / step).clamp(0, 15)
    if not _fits(b, q * d + lo, torch.maximum(d, lo.abs() * 1e-6)):
        return None
    return q.to(torch.int8), d.squeeze(-1), lo.squeeze(-1)


class GridLinear(nn.Module):
    """A Linear whose weight is on an affine 4-bit grid: `main` (symmetric 4-bit values) plus
    the per-block offsets `offset(sums(x))`; equal to the original Linear up to fp32 rounding."""

    def __init__(self, main: nn.Linear, sums: nn.Linear, offset: nn.Linear):
        super().__init__()
        self.main, self.sums, self.offset = main, sums, offset
        self.in_features, self.out_features = main.in_features, main.out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.main(x) + self.offset(self.sums(x))


class BlockSums(nn.Linear):
    """x E^T: the sum of each block of `group_size` inputs (E is 0/1). q, k and v (and gate and
    up) read one input: the last input and its sums are kept, so a traced graph computes the
    sums once per input rather than once per Linear (the input is held, so `is` cannot match
    a new tensor that reuses a freed one's id)."""

    def __init__(self, in_features: int, group_size: int):
        super().__init__(in_features, in_features // group_size, bias=False)
        with torch.no_grad():
            self.weight.copy_(torch.eye(in_features // group_size).repeat_interleave(group_size, dim=1))
        self.requires_grad_(False)
        self._last: tuple[torch.Tensor, torch.Tensor] | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._last is None or self._last[0] is not x:
            self._last = (x, super().forward(x))
        return self._last[1]


def split_affine(model: nn.Module, group_size: int = GROUP) -> int:
    """Replace each decoder Linear whose weight is on a Q4_1 grid (and not already symmetric)
    by a `GridLinear`, one per shared weight (every depth that shared the weight shares the
    GridLinear). Only for a model `compress.load` read from a GGUF, and only for the GGUF's
    block size. Returns the number of unique weights split."""
    if source_grid(model) is None or group_size != GROUP:
        return 0
    head = model.get_output_embeddings()
    sums: dict[int, BlockSums] = {}
    made: dict[int, GridLinear | None] = {}
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if not isinstance(child, nn.Linear) or child is head or child.in_features % group_size:
                continue
            key = id(child.weight)
            if key not in made:
                made[key] = _grid_linear(child, group_size, sums)
            if made[key] is not None:
                setattr(parent, name, made[key])
    return sum(g is not None for g in made.values())


def _grid_linear(linear: nn.Linear, group_size: int, sums: dict[int, BlockSums]) -> GridLinear | None:
    if centered_grid(linear.weight, group_size) is not None:
        return None  # already symmetric (Q4_0): stored exactly as it is
    grid = affine_grid(linear.weight, group_size)
    if grid is None:
        return None
    q, d, m = grid
    main = nn.Linear(linear.in_features, linear.out_features, bias=linear.bias is not None)
    offset = nn.Linear(d.shape[1], linear.out_features, bias=False)
    with torch.no_grad():
        main.weight.copy_((d[..., None] * (q.float() - 8)).reshape(linear.weight.shape))
        offset.weight.copy_(m + 8 * d)
        if linear.bias is not None:
            main.bias.copy_(linear.bias)
    block_sums = sums.setdefault(linear.in_features, BlockSums(linear.in_features, group_size))
    return GridLinear(main.requires_grad_(False), block_sums, offset.requires_grad_(False))


def aux_weights(model: nn.Module) -> set[int]:
    """ids of the split's `sums` and `offset` weights: never quantized as 4-bit weights."""
    return {id(p) for m in model.modules() if isinstance(m, GridLinear) for p in (m.sums.weight, m.offset.weight)}


def offset_weights(model: nn.Module) -> set[int]:
    """ids of the split's `offset` weights: ExecuTorch stores them 8da8w (per row), a quarter of
    fp32's bytes (the dense 8da4w+emb8 file with them measures x1.017 of fp32, quant_exports.md);
    the block sums E stay fp32 (0/1, shared, tiny)."""
    return {id(m.offset.weight) for m in model.modules() if isinstance(m, GridLinear)}
