-- Runs once, when the postgres volume is first initialised (docker-entrypoint-initdb.d).
-- The tracking store uses the database named by POSTGRES_DB (mlflow); the basic-auth user
-- store gets its own, so that the two sets of Alembic migrations never share a version table.
CREATE DATABASE mlflow_auth;
