"""``python -m trainkv``: the ``trainkv`` command."""

from .cli import main

raise SystemExit(main())
