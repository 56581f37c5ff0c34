//! Integration tests: the real server over TCP, on real PostgreSQL + pgvector and Redis.

#[path = "../common/mod.rs"]
mod common;

mod cli;
mod health;
mod reflection;
mod unimplemented;
