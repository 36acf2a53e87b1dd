"""``python -m dla``: the ``dla`` command (also ``torchrun --nproc_per_node=N -m dla train ...``)."""

from dla.cli import main

raise SystemExit(main())
