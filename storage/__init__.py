"""Storage: the SQLAlchemy models, the engine, the queries pages and the runner use, and migrations."""
