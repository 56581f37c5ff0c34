//! TMWS — the Trinitas Memory & Workflow Service.
//!
//! A gRPC service giving multi-agent AI systems a semantic memory (PostgreSQL + pgvector) and
//! durable workflows. Data flows one way: `api -> domain -> store`; [`server`] wires it up.

pub mod api;
pub mod auth;
pub mod config;
pub mod embed;
pub mod error;
pub mod health;
pub mod memory;
pub mod page_token;
pub mod server;
pub mod store;
pub mod telemetry;
pub mod workflow;

/// Code generated from `proto/tmws/v1/*.proto`.
pub mod pb {
    #![allow(clippy::all, clippy::pedantic, missing_docs)]
    tonic::include_proto!("tmws.v1");

    /// The encoded descriptor set served by reflection.
    pub const FILE_DESCRIPTOR_SET: &[u8] = tonic::include_file_descriptor_set!("tmws_descriptor");
}
