"""Rounding fp32 to a kernel's output dtype, shared by the ops' Triton kernels.

bf16 is rounded by hand: Triton's interpreter truncates fp32 -> bf16, in `.to()` and in stores, whatever
the rounding mode (measured with Triton 3.9: 49.6% of randn values land one ulp toward zero), so tests
would check a worse kernel than the GPU runs. The integer ops below give round-to-nearest-even exactly as
the GPU's conversion and PyTorch do, and they run on the GPU too (a handful per element of memory-bound
kernels), so what the tests check is what runs there.
"""

import triton
import triton.language as tl


@triton.jit
def round_to(x, dtype: tl.constexpr):
    """fp32 x rounded to nearest even in `dtype`."""
    if dtype == tl.bfloat16:
        bits = x.to(tl.uint32, bitcast=True)
        # Adding 0x7FFF, plus 1 when the lowest kept bit is set, carries into the kept 16 bits exactly when
        # the dropped 16 are above half an ulp, or at half with an odd kept bit; fp32 max rounds to inf.
        nearest = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
        # A NaN must stay a NaN: with an all-ones payload (NVIDIA's canonical fp32 NaN is 0x7FFFFFFF) the
        # addition would carry into the sign and give -0.0. Keep its top half and set the quiet bit.
        nan = (bits >> 16) | 0x40
        return tl.where(x != x, nan, nearest).to(tl.uint16).to(tl.bfloat16, bitcast=True)
    else:
        return x.to(dtype)
