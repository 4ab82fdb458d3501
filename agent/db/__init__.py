"""The database: engine and sessions (``engine``), the schema (``models``) and its Alembic
migrations, and the read/write functions of the flagged registry, users and worklist."""
