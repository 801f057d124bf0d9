"""The TRL range this integration is tested on, checked when ``opd_kernels.integrations.trl``
is imported (``GKDTrainer`` and ``DistillationTrainer`` move and change across TRL versions)."""
from __future__ import annotations

TESTED_TRL = (">=1.16", "<1.17")  # the range tests/test_trl.py and tests/test_trl_distillation.py ran on


def check_version():
    """Raise ``ImportError`` (with the install hint) unless TRL in :data:`TESTED_TRL` is importable."""
    try:
        import trl
    except ImportError as e:
        raise ImportError("opd_kernels.integrations.trl needs TRL: pip install 'opd-kernels[trl]'") from e
    from packaging.version import Version

    v = Version(trl.__version__)
    if not (Version("1.16") <= v < Version("1.17")):
        raise ImportError(f"opd_kernels.integrations.trl is tested with trl{','.join(TESTED_TRL)} (where GKDTrainer is "
                          "trl.experimental.gkd.GKDTrainer and DistillationTrainer is trl.DistillationTrainer); "
                          f"found trl {trl.__version__}. Install the tested range: pip install 'opd-kernels[trl]'")
