"""``python -m opd_train``: train a student on the bundled task (or your own data); see --help."""
import sys

from .train import main

sys.exit(main())
