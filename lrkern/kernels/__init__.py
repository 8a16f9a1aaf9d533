"""Triton kernels, one module per op family. Installed as ``lrkern.kernels`` (never as a top-level ``kernels``).

Each module holds ``@triton.jit`` kernels (``_name_kernel``) and their host launchers (``name(...)``), which allocate
outputs, pick block sizes and launch. Launchers assume validated, contiguous input: validation lives in
``lrkern.ops``. They take CUDA tensors, and CPU tensors under ``TRITON_INTERPRET=1``.
"""
