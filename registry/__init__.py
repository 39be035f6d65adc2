"""WHAT EXISTS: the expert registry (SQLAlchemy 2 + Alembic), artifact store, validation, API keys.

The registry imports nothing from routers/, composer/ or services/.
"""
