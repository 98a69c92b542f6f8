"""What a solver returns for one Linear: the quantized tensors in the layouts of calibra.ops.quantize
(so exports can pack them), the dequantized weight, and the per-module log row."""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

from calibra.ops import hadamard


@dataclass
class ModuleLog:
    """One row of the per-module log (report.json lists these)."""

    module: str
    layer: int | None
    method: str
    loss: float
    """GPTQ's loss: sum over weights of (w - q)^2 / U[i,i]^2 / 2 (with H = 2 X^T X / samples); for RTN
    the plain squared error sum / 2."""
    samples: int
    """Tokens behind the Hessian (0 for RTN)."""
    damp: float
    """Absolute damping added to diag(H) (0 for RTN)."""
    damp_percent: float
    """The damp_percent that succeeded (the config's, or a ladder value)."""
    ladder_steps: int
    """Failed Cholesky attempts before the one that succeeded (0 = the first try)."""
    float64: bool
    """True when the factorization needed float64."""
    dead_channels: int
    block_size: int
    seconds: float
    clip: str = "none"
    """The clipping the result kept: "none", "weight" (searched by squared weight error) or "output"
    (searched by the activation-weighted error and measured better than no clip)."""
    output_error: float | None = None
    """Relative output error tr((W-Q) H (W-Q)^T) / tr(W H W^T) on the calibration Hessian, where the
    solve measured it (the output clip search's guard, MR-GPTQ's per-layer choice)."""
    choice: dict | None = None
    """MR-GPTQ's per-layer choice: the kept candidate and every candidate's output error."""

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class QuantizedLayer:
    """One quantized weight ``[out, in]``.

    Integer: ``weight ~ (codes - zeros[:, g]) * scales[:, g]`` with ``g = g_idx[col]`` (or col // group_size
    when g_idx is None; one group when group_size is -1). FP4: ``e2m1(codes) * scales / global_scale``
    per group of 16/32 columns (scales float8_e4m3fn for nvfp4, uint8 E8M0 for mxfp4). FP8: ``codes``
    float8_e4m3fn ``[out, in]``, ``weight ~ codes * scales`` with scales ``[out, 1]`` (per channel).
    With a ``rotation`` the tensors describe the rotated weight W' = hadamard(W, block_size) over the
    input dim: ``y = W' @ hadamard(x, block_size)``; :meth:`dense` gives the weight in the original space.
    """

    name: str
    method: str
    format: str
    bits: int
    group_size: int
    symmetric: bool
    codes: torch.Tensor
    scales: torch.Tensor
    zeros: torch.Tensor | None
    g_idx: torch.Tensor | None
    global_scale: torch.Tensor | None
    weight: torch.Tensor
    """The dequantized weight in the stored (rotated, if any) space, in the original dtype."""
    rotation: dict | None
    log: ModuleLog

    def dequantize(self) -> torch.Tensor:
        """The weight rebuilt from codes/scales/zeros/g_idx (equals ``weight``), in the stored space."""
        out, n = self.codes.shape
        if self.format == "fp8":
            from calibra.quant.fp8 import fp8_dequantize

            return fp8_dequantize(self.codes, self.scales).to(self.weight.dtype)
        if self.format == "int":
            gs = n if self.group_size == -1 else self.group_size
            if self.g_idx is None and n % gs == 0:
                # contiguous groups: broadcast each group's scale and zero instead of gathering [out, in]
                # copies of them (the same products, so the same bits; several times faster)
                c = self.codes.reshape(out, n // gs, gs).float()
                z, s = self.zeros.float()[:, :, None], self.scales.float()[:, :, None]
                return ((c - z) * s).view(out, n).to(self.weight.dtype)
            g = self.g_idx.long() if self.g_idx is not None else torch.arange(n, device=self.codes.device) // gs
            s = self.scales.float()[:, g]
            z = self.zeros.float()[:, g]
            return ((self.codes.float() - z) * s).to(self.weight.dtype)
        return torch.ops.calibra.dequantize_fp4(
            self.codes, self.scales, self.global_scale, self.format, self.weight.dtype
        )

    def dense(self) -> torch.Tensor:
        """The effective weight in the original input space (un-rotated), for evaluation in place."""
        if self.rotation is None:
            return self.weight
        return hadamard(self.weight.float(), self.rotation["block_size"]).to(self.weight.dtype)

    def slim(self) -> QuantizedLayer:
        """A copy whose tensors are on the meta device: the shapes, dtypes and settings a manifest or an
        export's config needs, without the memory (a streamed job keeps these once a layer is written)."""
        import dataclasses

        def meta(t):
            return None if t is None else t.to("meta")

        return dataclasses.replace(
            self,
            codes=meta(self.codes),
            scales=meta(self.scales),
            zeros=meta(self.zeros),
            g_idx=meta(self.g_idx),
            global_scale=meta(self.global_scale),
            weight=meta(self.weight),
        )
