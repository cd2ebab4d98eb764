"""What the lab concludes from measured runs, torch-free: the one statistics helper (`stats`) that bench/, the
Compare page and `python -m runner compare` share."""
