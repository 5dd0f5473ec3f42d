"""``python -m adaptive_kernels``: the same as the ``adaptive-kernels`` command."""

from .cli import main

raise SystemExit(main())
