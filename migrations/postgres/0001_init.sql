-- TMWS schema, version 1: the extensions every later migration relies on.
-- pgvector provides the `vector` type and the HNSW index used by semantic search.
CREATE EXTENSION IF NOT EXISTS vector;
