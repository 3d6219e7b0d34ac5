"""Dense softmax attention with mask and score modifications: reference, XLA path, Pallas kernels, dispatch."""

from pallas_kernels.flash import cudnn as _cudnn
from pallas_kernels.flash import pallas as _pallas
from pallas_kernels.flash.api import (DISPATCH, AttentionCall, flash_attention,
                                      register_backend)

# "auto": the compiled kernels ahead of XLA on their hardware. On CPU the
# interpret twins run only when named (or via implementation="pallas").
register_backend(_pallas.PALLAS_TPU, ["tpu"])
register_backend(_pallas.PALLAS_TRITON, ["gpu"])
DISPATCH.register(_pallas.PALLAS_INTERPRET, ["cpu"], auto=False)
DISPATCH.register(_pallas.PALLAS_TPU_INTERPRET, ["cpu"], auto=False)
DISPATCH.register(_cudnn.CUDNN, ["gpu"], auto=False)
# Not in "auto" until an H100 has run its tests and benchmark (bench/results/).
DISPATCH.register(_pallas.PALLAS_MOSAIC_GPU, ["gpu"], auto=False)

__all__ = ["AttentionCall", "flash_attention", "register_backend"]
