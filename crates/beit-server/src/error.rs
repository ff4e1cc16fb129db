//! Errors: `ServerError` for starting and running the server, `ApiError` for what a request gets back
//! (an HTTP status and the JSON body `{"error": ..., "error_type": ..., "request_id": ...}`, as
//! text-embeddings-inference answers). [`ApiError::from_beit`] is the one place a library error becomes a status.

use std::fmt;
use std::hash::{BuildHasher, Hasher};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;

use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use beit::processor::ProcessorError;
use beit::{BeitError, ErrorKind};

/// Starting or running the server failed.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error("invalid setting --{name}: {message}")]
    Config { name: &'static str, message: String },
    #[error("loading the model: {0}")]
    Load(String),
    #[error("the model thread: {0}")]
    Worker(String),
    #[error("binding {addr}: {source}")]
    Bind { addr: String, source: std::io::Error },
    #[error("serving: {0}")]
    Serve(std::io::Error),
}

/// What kind of failure a request met; the `error_type` field of the answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorType {
    /// A malformed request: bad JSON, bad base64, no image in a form, a bad parameter (400).
    Validation,
    /// The bytes are not an image the server can decode (400).
    InvalidImage,
    /// The image's header says it has more pixels than --max-image-pixels (400).
    ImageTooLarge,
    /// The model checkpoint has no head for this task (400).
    Unsupported,
    /// No API key, or not one of the server's (401, with `WWW-Authenticate: Bearer`).
    Unauthorized,
    /// No such endpoint (404).
    NotFound,
    /// The endpoint takes another method (405).
    MethodNotAllowed,
    /// The body is larger than --max-body-bytes (413).
    PayloadTooLarge,
    /// The body did not arrive in time (408).
    Timeout,
    /// The queue is full (503, with Retry-After).
    Overloaded,
    /// The request waited in the queue longer than --max-queue-wait-ms (503, with Retry-After).
    QueueTimeout,
    /// The model thread is gone (503).
    Unhealthy,
    /// A fault in the server or the model, not in the request (500): the cause is logged under the request id.
    Backend,
}

impl ErrorType {
    /// The `error_type` field.
    pub fn as_str(&self) -> &'static str {
        match self {
            ErrorType::Validation => "validation",
            ErrorType::InvalidImage => "invalid_image",
            ErrorType::ImageTooLarge => "image_too_large",
            ErrorType::Unsupported => "unsupported",
            ErrorType::Unauthorized => "unauthorized",
            ErrorType::NotFound => "not_found",
            ErrorType::MethodNotAllowed => "method_not_allowed",
            ErrorType::PayloadTooLarge => "payload_too_large",
            ErrorType::Timeout => "timeout",
            ErrorType::Overloaded => "overloaded",
            ErrorType::QueueTimeout => "queue_timeout",
            ErrorType::Unhealthy => "unhealthy",
            ErrorType::Backend => "backend",
        }
    }

    /// A refusal of the server's (overload, a limit, a missing key) rather than an answer about the request's
    /// content: counted by reason on /metrics.
    pub fn is_rejection(&self) -> bool {
        matches!(
            self,
            ErrorType::Overloaded
                | ErrorType::QueueTimeout
                | ErrorType::Unauthorized
                | ErrorType::Timeout
                | ErrorType::PayloadTooLarge
        )
    }

    /// The HTTP status.
    pub fn status(&self) -> StatusCode {
        match self {
            ErrorType::Validation | ErrorType::InvalidImage | ErrorType::ImageTooLarge | ErrorType::Unsupported => {
                StatusCode::BAD_REQUEST
            }
            ErrorType::Unauthorized => StatusCode::UNAUTHORIZED,
            ErrorType::NotFound => StatusCode::NOT_FOUND,
            ErrorType::MethodNotAllowed => StatusCode::METHOD_NOT_ALLOWED,
            ErrorType::PayloadTooLarge => StatusCode::PAYLOAD_TOO_LARGE,
            ErrorType::Timeout => StatusCode::REQUEST_TIMEOUT,
            ErrorType::Overloaded | ErrorType::QueueTimeout | ErrorType::Unhealthy => StatusCode::SERVICE_UNAVAILABLE,
            ErrorType::Backend => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }
}

/// Names one request in the answer and in the server's log, so a 500's logged cause can be found.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct RequestId(pub String);

/// The header that carries a request's id, both ways.
pub const REQUEST_ID_HEADER: &str = "x-request-id";

impl RequestId {
    /// A client's id if it is usable in logs and headers (1 to 128 characters of letters, digits and `-_.:`),
    /// else `None`.
    pub fn from_client(value: &[u8]) -> Option<RequestId> {
        let ok = (1..=128).contains(&value.len())
            && value.iter().all(|&b| b.is_ascii_alphanumeric() || b"-_.:".contains(&b));
        ok.then(|| RequestId(String::from_utf8_lossy(value).into_owned()))
    }

    /// A fresh id, unique within this process and unlikely to repeat across restarts: a random prefix drawn once
    /// per process and a counter.
    pub fn new() -> Self {
        static PREFIX: OnceLock<u32> = OnceLock::new();
        static NEXT: AtomicU64 = AtomicU64::new(1);
        // std's RandomState is seeded randomly per process: enough to tell two runs of the server apart.
        let prefix =
            *PREFIX.get_or_init(|| std::collections::hash_map::RandomState::new().build_hasher().finish() as u32);
        RequestId(format!("{prefix:08x}-{:06}", NEXT.fetch_add(1, Ordering::Relaxed)))
    }
}

impl Default for RequestId {
    fn default() -> Self {
        Self::new()
    }
}

impl fmt::Display for RequestId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// A failed request: its status comes from the error type.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{message}")]
pub struct ApiError {
    /// What kind of failure; sets the status.
    pub kind: ErrorType,
    /// What the client is told.
    pub message: String,
    /// Answer with `Connection: close`: the request's body was not read (an early refusal), so the connection
    /// cannot carry another request.
    pub close: bool,
    /// The request's id, in the body when known.
    pub request_id: Option<RequestId>,
}

/// Seconds a client is asked to wait before retrying a request refused because the queue was full.
pub const RETRY_AFTER_SECS: u32 = 1;

impl ApiError {
    /// An error of `kind` saying `message`.
    pub fn new(kind: ErrorType, message: impl Into<String>) -> Self {
        ApiError { kind, message: message.into(), close: false, request_id: None }
    }

    /// The one place a library error becomes an answer. What the caller can fix (invalid input, a bad image, a
    /// task the model lacks) is a 400 with the library's message, which names what was expected and found.
    /// Anything else (I/O, an internal fault, a divergence) is not the caller's doing: a 500 with a generic message
    /// and the request id, and the cause logged under that id.
    pub fn from_beit(e: &BeitError, id: &RequestId) -> Self {
        let kind = match (e.kind(), e) {
            (_, BeitError::Processor(ProcessorError::TooManyPixels { .. })) => ErrorType::ImageTooLarge,
            (ErrorKind::InvalidInput | ErrorKind::Format, BeitError::Processor(_)) => ErrorType::InvalidImage,
            (ErrorKind::InvalidInput | ErrorKind::Format, _) => ErrorType::Validation,
            (ErrorKind::Unsupported, _) => ErrorType::Unsupported,
            (ErrorKind::Io | ErrorKind::Internal | ErrorKind::Diverged, _) => ErrorType::Backend,
        };
        let message = match kind {
            ErrorType::Backend => {
                tracing::error!(request_id = %id, kind = ?e.kind(), "request failed: {e}");
                format!("the server failed on this request (not a fault in the request); its cause is logged under request id {id}")
            }
            ErrorType::ImageTooLarge => format!("{e} (the server's --max-image-pixels)"),
            _ => e.to_string(),
        };
        Self::new(kind, message).with_request_id(id)
    }

    /// The same error, naming the request.
    pub fn with_request_id(mut self, id: &RequestId) -> Self {
        self.request_id = Some(id.clone());
        self
    }

    /// The same error, answered with `Connection: close`.
    pub fn closing(mut self) -> Self {
        self.close = true;
        self
    }

    /// A malformed request (400).
    pub fn validation(message: impl Into<String>) -> Self {
        Self::new(ErrorType::Validation, message)
    }

    /// The HTTP status.
    pub fn status(&self) -> StatusCode {
        self.kind.status()
    }
}

impl ApiError {
    /// The JSON body: `{"error", "error_type"}`, and `"request_id"` when known.
    pub fn body(&self) -> serde_json::Value {
        let mut body = serde_json::json!({"error": self.message, "error_type": self.kind.as_str()});
        if let Some(id) = &self.request_id {
            body["request_id"] = id.0.clone().into();
        }
        body
    }
}

impl IntoResponse for ApiError {
    /// The answer; the error itself rides along in the response's extensions, so the outermost middleware can
    /// count it and add the request id to a body written without one.
    fn into_response(self) -> Response {
        let mut resp = (self.status(), axum::Json(self.body())).into_response();
        if matches!(self.kind, ErrorType::Overloaded | ErrorType::QueueTimeout) {
            resp.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from(RETRY_AFTER_SECS));
        }
        if self.close {
            resp.headers_mut().insert(header::CONNECTION, HeaderValue::from_static("close"));
        }
        resp.extensions_mut().insert(self);
        resp
    }
}
