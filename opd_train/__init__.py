"""opd_train: a compact trainer for on-policy distillation methods built on `opd_kernels`.

``python -m opd_train --help`` lists methods and options; ``python -m opd_train.compare`` runs
all methods on one budget. See `opd_train.train` for the loop and `opd_train.methods` for the
methods.
"""
