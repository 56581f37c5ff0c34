//! gRPC adapters, one file per service: validate, authorize, convert, call the domain.

use std::pin::Pin;

use futures_util::Stream;
use tonic::Status;

pub mod agent;
pub mod convert;
pub mod memory;
pub mod workflow;

pub use agent::AgentApi;
pub use memory::MemoryApi;
pub use workflow::WorkflowApi;

/// The response stream type of server-streaming methods.
pub type EventStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send + 'static>>;
