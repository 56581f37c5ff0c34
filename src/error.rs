//! One error type for the whole service and its single mapping to `tonic::Status`.
//!
//! Every status carries a `google.rpc.ErrorInfo` (reason in UPPER_SNAKE_CASE, domain `tmws`);
//! invalid input carries `google.rpc.BadRequest` field violations; RESOURCE_EXHAUSTED carries
//! `google.rpc.RetryInfo` and a `retry-after` header. Database and internal errors are logged
//! with their detail and reach the caller only as a generic message.

use std::{collections::HashMap, time::Duration};

use tonic::{Code, Status};
use tonic_types::{ErrorDetails, StatusExt};

pub const ERROR_DOMAIN: &str = "tmws";

/// One invalid field: `field` is the request path (e.g. `memory.tags[3]`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FieldViolation {
    pub field: String,
    pub description: String,
}

impl FieldViolation {
    pub fn new(field: impl Into<String>, description: impl Into<String>) -> Self {
        Self { field: field.into(), description: description.into() }
    }
}

/// Collects field violations so a caller learns every problem of a request at once.
#[derive(Debug, Default)]
pub struct Violations(pub Vec<FieldViolation>);

impl Violations {
    pub fn add(&mut self, field: impl Into<String>, description: impl Into<String>) {
        self.0.push(FieldViolation::new(field, description));
    }

    /// `Ok` when nothing was added, INVALID_ARGUMENT with every violation otherwise.
    pub fn into_result(self) -> Result<()> {
        if self.0.is_empty() { Ok(()) } else { Err(Error::InvalidArgument(self.0)) }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("invalid argument: {}", summarize(.0))]
    InvalidArgument(Vec<FieldViolation>),
    #[error("{resource} {id:?} not found")]
    NotFound { resource: &'static str, id: String },
    #[error("{0}")]
    AlreadyExists(String),
    /// A stale etag or a lost race: the caller should re-read and retry.
    #[error("{0}")]
    Aborted(String),
    #[error("{0}")]
    FailedPrecondition(String),
    #[error("{0}")]
    PermissionDenied(String),
    #[error("{0}")]
    Unauthenticated(String),
    #[error("{message}")]
    ResourceExhausted { message: String, retry_after: Duration },
    /// A dependency (database, Redis, embedding provider) cannot serve the call now.
    #[error("{0}")]
    Unavailable(String),
    /// The method exists in the contract but its implementation has not landed.
    #[error("{0} is not implemented yet")]
    Unimplemented(&'static str),
    #[error("database error: {0}")]
    Database(#[from] sqlx::Error),
    #[error("internal error: {0}")]
    Internal(String),
}

fn summarize(violations: &[FieldViolation]) -> String {
    violations.iter().map(|v| format!("{}: {}", v.field, v.description)).collect::<Vec<_>>().join("; ")
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    pub fn invalid(field: impl Into<String>, description: impl Into<String>) -> Self {
        Error::InvalidArgument(vec![FieldViolation::new(field, description)])
    }

    pub fn not_found(resource: &'static str, id: impl Into<String>) -> Self {
        Error::NotFound { resource, id: id.into() }
    }

    pub fn internal(message: impl Into<String>) -> Self {
        Error::Internal(message.into())
    }

    /// The canonical code and the machine-readable reason of this error.
    pub fn code_and_reason(&self) -> (Code, &'static str) {
        match self {
            Error::InvalidArgument(_) => (Code::InvalidArgument, "INVALID_ARGUMENT"),
            Error::NotFound { .. } => (Code::NotFound, "NOT_FOUND"),
            Error::AlreadyExists(_) => (Code::AlreadyExists, "ALREADY_EXISTS"),
            Error::Aborted(_) => (Code::Aborted, "CONFLICT"),
            Error::FailedPrecondition(_) => (Code::FailedPrecondition, "FAILED_PRECONDITION"),
            Error::PermissionDenied(_) => (Code::PermissionDenied, "PERMISSION_DENIED"),
            Error::Unauthenticated(_) => (Code::Unauthenticated, "UNAUTHENTICATED"),
            Error::ResourceExhausted { .. } => (Code::ResourceExhausted, "RATE_LIMITED"),
            Error::Unavailable(_) => (Code::Unavailable, "DEPENDENCY_UNAVAILABLE"),
            Error::Unimplemented(_) => (Code::Unimplemented, "NOT_IMPLEMENTED"),
            Error::Database(e) if is_unavailable(e) => (Code::Unavailable, "DATABASE_UNAVAILABLE"),
            Error::Database(_) | Error::Internal(_) => (Code::Internal, "INTERNAL"),
        }
    }
}

/// Database errors that mean "try again later" rather than "bug".
fn is_unavailable(e: &sqlx::Error) -> bool {
    match e {
        sqlx::Error::PoolTimedOut | sqlx::Error::PoolClosed | sqlx::Error::Io(_) | sqlx::Error::Tls(_) => true,
        sqlx::Error::Database(db) => {
            // 57P01 admin_shutdown, 57P03 cannot_connect_now, 53300 too_many_connections,
            // 08xxx connection exceptions, 40001/40P01 serialization/deadlock (retryable).
            // SQLite: 5 SQLITE_BUSY (and its extended 261/517), 6 SQLITE_LOCKED.
            matches!(db.code().as_deref(), Some(c) if c.starts_with("08") || c.starts_with("57P") || c == "53300" || c == "40001" || c == "40P01")
                || matches!(db.code().as_deref(), Some("5" | "6" | "261" | "517"))
        }
        _ => false,
    }
}

impl From<Error> for Status {
    fn from(err: Error) -> Status {
        let (code, reason) = err.code_and_reason();
        let mut metadata = HashMap::new();
        let message = match &err {
            Error::Database(e) => {
                // The SQL text and driver detail stay in the log, never in the response.
                if code == Code::Unavailable {
                    tracing::warn!(error = %e, "database unavailable");
                    "the database is temporarily unavailable; retry later".to_string()
                } else {
                    tracing::error!(error = %e, "database error");
                    "internal error".to_string()
                }
            }
            Error::Internal(detail) => {
                tracing::error!(error = %detail, "internal error");
                "internal error".to_string()
            }
            Error::NotFound { resource, id } => {
                metadata.insert("resource".to_string(), (*resource).to_string());
                metadata.insert("id".to_string(), id.clone());
                err.to_string()
            }
            Error::Unimplemented(method) => {
                metadata.insert("method".to_string(), (*method).to_string());
                err.to_string()
            }
            _ => err.to_string(),
        };

        let mut details = ErrorDetails::with_error_info(reason, ERROR_DOMAIN, metadata);
        if let Error::InvalidArgument(violations) = &err {
            for v in violations {
                details.add_bad_request_violation(v.field.clone(), v.description.clone());
            }
        }
        let retry_after = match &err {
            Error::ResourceExhausted { retry_after, .. } => Some(*retry_after),
            _ => None,
        };
        if let Some(delay) = retry_after {
            details.set_retry_info(Some(delay));
        }
        let mut status = Status::with_error_details(code, message, details);
        if let Some(delay) = retry_after {
            let secs = delay.as_secs_f64().ceil().max(1.0) as u64;
            if let Ok(value) = secs.to_string().parse() {
                status.metadata_mut().insert("retry-after", value);
            }
        }
        status
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn invalid_argument_carries_field_violations() {
        let status: Status = Error::InvalidArgument(vec![
            FieldViolation::new("memory.content", "must not be empty"),
            FieldViolation::new("memory.importance", "must be within 0..1"),
        ])
        .into();
        assert_eq!(status.code(), Code::InvalidArgument);
        let details = status.get_error_details();
        let bad = details.bad_request().expect("bad request details");
        assert_eq!(bad.field_violations.len(), 2);
        assert_eq!(bad.field_violations[0].field, "memory.content");
        let info = details.error_info().expect("error info");
        assert_eq!(info.domain, "tmws");
        assert_eq!(info.reason, "INVALID_ARGUMENT");
    }

    #[test]
    fn database_errors_do_not_leak() {
        let status: Status = Error::Database(sqlx::Error::Protocol("SELECT secret FROM t".into())).into();
        assert_eq!(status.code(), Code::Internal);
        assert!(!status.message().contains("SELECT"));
        let status: Status = Error::Database(sqlx::Error::PoolTimedOut).into();
        assert_eq!(status.code(), Code::Unavailable);
    }

    #[test]
    fn resource_exhausted_has_retry_after() {
        let status: Status =
            Error::ResourceExhausted { message: "slow down".into(), retry_after: Duration::from_millis(1500) }.into();
        assert_eq!(status.code(), Code::ResourceExhausted);
        assert_eq!(status.metadata().get("retry-after").and_then(|v| v.to_str().ok()), Some("2"));
        assert!(status.get_error_details().retry_info().is_some());
    }
}
