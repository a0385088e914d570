"""The server's store: SQLAlchemy Core tables, Alembic migrations, a threaded Store."""
