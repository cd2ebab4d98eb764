"""What the lab concludes from measured runs, torch-free: the one statistics helper (`stats`) that bench/, the
Compare page and `python -m runner compare` share, and which runs did the same work (`same_work`)."""
