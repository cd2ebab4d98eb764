"""Parallel GPT Lab runner: the spec of a run, the runner process, and the jobs it launches."""
