"""``python -m cmi_fused.glue`` is the ``cmi-glue`` console script."""

from .cli import console_main

console_main()
