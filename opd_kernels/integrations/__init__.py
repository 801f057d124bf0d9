"""Drop-in integrations with training frameworks (optional dependencies, imported on demand):

* ``opd_kernels.integrations.trl`` -- ``FusedGKDTrainer``, TRL's ``GKDTrainer`` with its loss
  through :func:`opd_kernels.fused_linear_distill_loss`, and ``FusedDistillationTrainer``, TRL's
  stable ``DistillationTrainer`` with its loss through the same op (``pip install opd-kernels[trl]``).
"""
