"""`python -m sdqueue ...` (used by `sdqueue dev` to start its children with the same interpreter)."""

from sdqueue.cli import main

raise SystemExit(main())
