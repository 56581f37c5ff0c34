//! Persistence. All SQL lives under this module; callers see domain types only.

pub mod postgres;
pub mod redis;

pub use postgres::PgStore;
pub use redis::RedisStore;
