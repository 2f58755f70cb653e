"""Triton kernels of cmi-fused (the import name ``kernels`` is shared with Hugging Face's hub-kernels package;
see the README: our distribution is ``cmi-fused``, so ``transformers.utils.is_kernels_available()`` stays False).

Importing this package does not import triton; import ``kernels.cmi`` for the op.
"""
