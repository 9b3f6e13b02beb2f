"""`python -m daemon`: the `rembgd` command line."""
from .cli import main

raise SystemExit(main())
