//! gRPC adapters, one file per service: validate, authorize, convert, call the domain.

use std::pin::Pin;

use futures_util::Stream;
use tonic::{Response, Status};

use crate::error::Error;

pub mod convert;
pub mod memory;
pub mod workflow;

pub use memory::MemoryApi;
pub use workflow::WorkflowApi;

/// The response stream type of server-streaming methods.
pub type EventStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send + 'static>>;

/// The answer of a method whose implementation has not landed: UNIMPLEMENTED with the method
/// name in the message and in `ErrorInfo.metadata["method"]`.
pub(crate) fn not_yet<T>(method: &'static str) -> Result<Response<T>, Status> {
    Err(Error::Unimplemented(method).into())
}
