//! Integration tests: the real server over TCP, on real PostgreSQL + pgvector and Redis.

#[path = "../common/mod.rs"]
mod common;

mod auth_cache;
mod cli;
mod health;
mod identity;
mod identity_jwt;
mod identity_tls;
mod memory;
mod memory_access;
mod memory_cache;
mod memory_embed;
mod memory_search;
mod ratelimit;
mod reflection;
mod transfer;
mod workflow;
mod workflow_replicas;
