"""Linear layers whose weights are packed once, on the CPU, in oneDNN's blocked layout.

``F.linear`` on the CPU hands a row-major weight to the GEMM, which re-packs it into its
blocked layout on every call. At decode's few rows per step that repacking costs about as
much as the product itself; packing once at load time (as inductor's ``freezing`` does
inside a compiled graph) removes it, in eager mode. The results differ from ``F.linear``
only in summation order (float32 rounding)."""

from __future__ import annotations

import torch
from torch import nn

#: The row count oneDNN picks the packed layout for. It only tunes the layout (any row
#: count is computed correctly); decode's micro-batches are about this size.
ROWS_HINT = 16


def packing_available(device: torch.device, dtype: torch.dtype) -> bool:
    """Float32 on a CPU with oneDNN: the only case measured to gain (BENCHMARKS.md)."""
    return device.type == "cpu" and dtype == torch.float32 and torch.backends.mkldnn.is_available()


class PackedLinear(nn.Module):
    """``nn.Linear``'s product with the weight kept only in the packed layout."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        packed = torch.ops.mkldnn._reorder_linear_weight(linear.weight.detach(), ROWS_HINT)
        self.packed_weight = nn.Parameter(packed, requires_grad=False)  # still counted as a weight
        self.bias = linear.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.mkldnn._linear_pointwise(x, self.packed_weight, self.bias, "none", [], "")

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, packed"


def pack_linears(module: nn.Module) -> int:
    """Replace every ``nn.Linear`` under ``module`` by a ``PackedLinear``; return how many.
    Only for modules that call their linear layers and never read ``.weight`` themselves.
    The module's other tensors (e.g. norm weights) are then copied: loaded from a shard
    file's memory map, they would keep the whole map, with the pages of the row-major
    weights just read, resident beside the packed copies."""
    count = 0
    for parent in list(module.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is nn.Linear:
                setattr(parent, name, PackedLinear(child))
                count += 1
    for tensor in [*module.parameters(), *module.buffers()]:
        if tensor.layout == torch.strided:
            tensor.data = tensor.data.clone()
    return count
