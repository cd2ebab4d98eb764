"""Developer commands run with `python -m scripts.<name>` from the repository root (see the Makefile)."""
