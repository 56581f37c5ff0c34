//! Integration tests: the real server over TCP, on real PostgreSQL + pgvector and Redis.

#[path = "../common/mod.rs"]
mod common;

mod cli;
mod health;
mod memory;
mod memory_access;
mod memory_embed;
mod memory_search;
mod reflection;
mod workflow;
mod workflow_replicas;
