"""Shared utilities. Importing the package quiets import-time notices that are not about the run: torchao
(a requirement, for int8 / fp8 frozen networks and the fp8 DiT) is imported by diffusers and transformers
whenever it is installed, and at that import it warns that its optional CUDA / CUTLASS extensions
(`_C_*.so`) do not load on this build, registers enums with a deprecated torch API, and diffusers warns
that torchao's older tensor types are absent. None of those kernels or types is used here (weight-only
int8 / fp8 and the fp8 matmuls run on torch's own ops), so these loggers keep errors only."""

import logging

for _name in ("torchao", "torch.utils._pytree", "diffusers.quantizers.torchao.torchao_quantizer"):
    logging.getLogger(_name).setLevel(logging.ERROR)
