"""`python -m popserve_client "question" ...` is the popserve-chat command."""
from .cli import main

raise SystemExit(main())
