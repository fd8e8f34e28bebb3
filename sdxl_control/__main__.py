"""``python -m sdxl_control``: the ``sdxl-control`` command."""

from .cli import main

raise SystemExit(main())
