"""Page logic with tests: turning form values into specs, formatting figures, drawing charts."""
