"""Triton kernels (CUDA tensors; CPU tensors under TRITON_INTERPRET=1).

Each module ``<op>.py`` here registers its launchers with ``_dispatch.register("triton", op)``
when imported. None is written yet: until then the triton backend implements no op, and CUDA
tensors run on the next backend of the auto order.
"""
