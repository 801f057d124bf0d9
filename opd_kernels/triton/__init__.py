"""Triton kernels of the ``triton`` backend (launchers: ``opd_kernels.backends.triton_backend``).

One op family per file: ``stats.py`` (single-pass online-softmax row statistics), ``jsd.py``
(JSD's second pass), ``grad.py`` (logits gradient recomputed from row statistics) and
``fused_linear.py`` (all of these fused with the lm_head matmul via ``tl.dot``).
Importing this package imports triton; set ``TRITON_INTERPRET=1`` before that to run the
kernels on CPU tensors.
"""
