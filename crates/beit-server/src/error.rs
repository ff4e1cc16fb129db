//! Errors: `ServerError` for starting and running the server, `ApiError` for what a request gets back
//! (an HTTP status and the JSON body `{"error": ..., "error_type": ...}`, as text-embeddings-inference answers).

use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};

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
    /// The model thread is gone (503).
    Unhealthy,
    /// The model failed on this input (500).
    Backend,
}

impl ErrorType {
    pub fn as_str(&self) -> &'static str {
        match self {
            ErrorType::Validation => "validation",
            ErrorType::InvalidImage => "invalid_image",
            ErrorType::ImageTooLarge => "image_too_large",
            ErrorType::Unsupported => "unsupported",
            ErrorType::NotFound => "not_found",
            ErrorType::MethodNotAllowed => "method_not_allowed",
            ErrorType::PayloadTooLarge => "payload_too_large",
            ErrorType::Timeout => "timeout",
            ErrorType::Overloaded => "overloaded",
            ErrorType::Unhealthy => "unhealthy",
            ErrorType::Backend => "backend",
        }
    }

    pub fn status(&self) -> StatusCode {
        match self {
            ErrorType::Validation | ErrorType::InvalidImage | ErrorType::ImageTooLarge | ErrorType::Unsupported => {
                StatusCode::BAD_REQUEST
            }
            ErrorType::NotFound => StatusCode::NOT_FOUND,
            ErrorType::MethodNotAllowed => StatusCode::METHOD_NOT_ALLOWED,
            ErrorType::PayloadTooLarge => StatusCode::PAYLOAD_TOO_LARGE,
            ErrorType::Timeout => StatusCode::REQUEST_TIMEOUT,
            ErrorType::Overloaded | ErrorType::Unhealthy => StatusCode::SERVICE_UNAVAILABLE,
            ErrorType::Backend => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }
}

/// A failed request: its status comes from the error type.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{message}")]
pub struct ApiError {
    pub kind: ErrorType,
    pub message: String,
    /// Answer with `Connection: close`: the request's body was not read (an early refusal), so the connection
    /// cannot carry another request.
    pub close: bool,
}

/// Seconds a client is asked to wait before retrying a request refused because the queue was full.
pub const RETRY_AFTER_SECS: u32 = 1;

impl ApiError {
    pub fn new(kind: ErrorType, message: impl Into<String>) -> Self {
        ApiError { kind, message: message.into(), close: false }
    }

    /// The same error, answered with `Connection: close`.
    pub fn closing(mut self) -> Self {
        self.close = true;
        self
    }

    pub fn validation(message: impl Into<String>) -> Self {
        Self::new(ErrorType::Validation, message)
    }

    pub fn backend(message: impl Into<String>) -> Self {
        Self::new(ErrorType::Backend, message)
    }

    pub fn status(&self) -> StatusCode {
        self.kind.status()
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = serde_json::json!({"error": self.message, "error_type": self.kind.as_str()});
        let mut resp = (self.status(), axum::Json(body)).into_response();
        if self.kind == ErrorType::Overloaded {
            resp.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from(RETRY_AFTER_SECS));
        }
        if self.close {
            resp.headers_mut().insert(header::CONNECTION, HeaderValue::from_static("close"));
        }
        resp
    }
}
