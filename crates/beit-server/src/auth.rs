//! Access control. API keys: with any configured, every endpoint but `/health` and the page's files requires
//! `Authorization: Bearer <key>`, checked in constant time against every key; keys are never logged or shown
//! (`Debug` prints only how many there are). CORS: off unless origins are named; then those origins' browsers may
//! call the API.

use std::fmt;
use std::path::Path;
use std::sync::Arc;

use axum::extract::{Request, State};
use axum::http::{header, HeaderValue, Method, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};

use crate::error::{ApiError, ErrorType, ServerError};
use crate::page;

/// The keys a request may present; none means the server is open.
#[derive(Clone, Default)]
pub struct ApiKeys(Vec<Vec<u8>>);

impl fmt::Debug for ApiKeys {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ApiKeys({} keys)", self.0.len())
    }
}

impl ApiKeys {
    /// Keys as given; `source` names where they came from in errors (never the key itself). A key must be a bearer
    /// token: visible ASCII, no spaces.
    pub fn new<I, S>(keys: I, source: &str) -> Result<Self, ServerError>
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        let mut out = Vec::new();
        for (i, key) in keys.into_iter().enumerate() {
            let key = key.into();
            if key.is_empty() || !key.bytes().all(|b| b.is_ascii_graphic()) {
                let found = if key.is_empty() { "an empty key" } else { "spaces or characters outside visible ASCII" };
                let message =
                    format!("key {} of {source}: expected visible ASCII without spaces, found {found}", i + 1);
                return Err(ServerError::Config { name: "api-key", message });
            }
            out.push(key.into_bytes());
        }
        Ok(ApiKeys(out))
    }

    /// Keys from a file, one per line; blank lines and lines starting with `#` are skipped.
    pub fn from_file(path: &Path) -> Result<Self, ServerError> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| ServerError::Config { name: "api-key-file", message: format!("{}: {e}", path.display()) })?;
        Self::parse(&text, &path.display().to_string())
    }

    /// Keys from a keys file's text (see [`ApiKeys::from_file`]).
    pub fn parse(text: &str, source: &str) -> Result<Self, ServerError> {
        let lines = text.lines().map(str::trim).filter(|l| !l.is_empty() && !l.starts_with('#'));
        let keys = Self::new(lines, source)?;
        if keys.is_empty() {
            let message = format!("{source}: expected at least one key, found none");
            return Err(ServerError::Config { name: "api-key-file", message });
        }
        Ok(keys)
    }

    /// These keys and `other`'s.
    pub fn merged(mut self, other: ApiKeys) -> Self {
        self.0.extend(other.0);
        self
    }

    /// No keys: every request is let in.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// How many keys.
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// Whether `presented` is one of the keys. Every key is compared in full, so the time taken says nothing about
    /// which key matched or how much of one did.
    pub fn accepts(&self, presented: &[u8]) -> bool {
        self.0.iter().fold(false, |ok, key| ok | constant_time_eq(key, presented))
    }
}

/// Equality whose time depends only on the lengths, not on where the bytes differ.
fn constant_time_eq(key: &[u8], presented: &[u8]) -> bool {
    let mut diff = u8::from(key.len() != presented.len());
    for (i, &p) in presented.iter().enumerate() {
        diff |= key.get(i).copied().unwrap_or(0) ^ p;
    }
    std::hint::black_box(diff) == 0
}

/// The paths open without a key: a load balancer's health check must not need one, nor a browser loading the page
/// (which then asks for the key).
const OPEN_PATHS: &[&str] = &["/health", page::INDEX, page::CSS, page::JS];

/// The token of an `Authorization: Bearer <token>` header (the scheme in any case).
fn bearer(req: &Request) -> Option<&[u8]> {
    let value = req.headers().get(header::AUTHORIZATION)?.as_bytes();
    let (scheme, token) = value.split_at_checked(7)?;
    scheme.eq_ignore_ascii_case(b"bearer ").then(|| token.trim_ascii())
}

/// Middleware: refuses (401) a request without a valid key, before its body is read.
pub async fn require_key(State(keys): State<Arc<ApiKeys>>, req: Request, next: Next) -> Response {
    if keys.is_empty() || OPEN_PATHS.contains(&req.uri().path()) {
        return next.run(req).await;
    }
    let message = match bearer(&req) {
        Some(token) if keys.accepts(token) => return next.run(req).await,
        Some(_) => "the API key is not valid",
        None => "this server requires an API key: send `Authorization: Bearer <key>`",
    };
    let mut resp = ApiError::new(ErrorType::Unauthorized, message).closing().into_response();
    resp.headers_mut().insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
    resp
}

/// The origins whose pages may call the API from a browser; none: CORS off (no CORS headers at all).
#[derive(Debug, Clone, Default)]
pub struct CorsOrigins(pub Vec<String>);

impl CorsOrigins {
    /// The `Origin` header's value if it is allowed (`*` allows any).
    fn allows<'a>(&self, req: &'a Request) -> Option<&'a HeaderValue> {
        let origin = req.headers().get(header::ORIGIN)?;
        self.0.iter().any(|o| o == "*" || o.as_bytes() == origin.as_bytes()).then_some(origin)
    }
}

/// How long a browser may cache a preflight's answer, seconds.
const PREFLIGHT_MAX_AGE: u32 = 600;

/// Middleware (outside the key check: preflights carry no key): answers an allowed origin's preflight with 204,
/// and marks answers to an allowed origin's requests as readable by its page.
pub async fn cors(State(origins): State<Arc<CorsOrigins>>, req: Request, next: Next) -> Response {
    let Some(origin) = origins.allows(&req).cloned() else {
        return next.run(req).await;
    };
    let preflight =
        req.method() == Method::OPTIONS && req.headers().contains_key(header::ACCESS_CONTROL_REQUEST_METHOD);
    let mut resp = if preflight { StatusCode::NO_CONTENT.into_response() } else { next.run(req).await };
    let h = resp.headers_mut();
    h.insert(header::ACCESS_CONTROL_ALLOW_ORIGIN, origin);
    h.append(header::VARY, HeaderValue::from_static("origin"));
    if preflight {
        h.insert(header::ACCESS_CONTROL_ALLOW_METHODS, HeaderValue::from_static("GET, POST"));
        let allowed = HeaderValue::from_static("authorization, content-type, x-request-id");
        h.insert(header::ACCESS_CONTROL_ALLOW_HEADERS, allowed);
        h.insert(header::ACCESS_CONTROL_MAX_AGE, HeaderValue::from(PREFLIGHT_MAX_AGE));
    } else {
        h.insert(header::ACCESS_CONTROL_EXPOSE_HEADERS, HeaderValue::from_static("x-request-id, retry-after"));
    }
    resp
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn equality() {
        assert!(constant_time_eq(b"secret", b"secret"));
        for other in [&b"secreT"[..], b"secre", b"secrets", b"", b"Secret"] {
            assert!(!constant_time_eq(b"secret", other), "{other:?}");
        }
        let keys = ApiKeys::new(["k1", "key-two"], "test").unwrap();
        assert!(keys.accepts(b"k1") && keys.accepts(b"key-two"));
        assert!(!keys.accepts(b"k") && !keys.accepts(b"key-two ") && !keys.accepts(b""));
    }

    #[test]
    fn keys_files_and_refusals() {
        let keys = ApiKeys::parse("# team keys\nalpha-1\n\n  beta-2  \n", "keys.txt").unwrap();
        assert_eq!(keys.len(), 2);
        assert!(keys.accepts(b"beta-2"));
        // Never shown.
        assert_eq!(format!("{keys:?}"), "ApiKeys(2 keys)");
        let e = ApiKeys::parse("# nothing\n", "keys.txt").unwrap_err().to_string();
        assert!(e.contains("keys.txt: expected at least one key, found none"), "{e}");
        let e = ApiKeys::new(["fine", "has space"], "--api-key").unwrap_err().to_string();
        assert!(e.contains("key 2 of --api-key") && !e.contains("has space"), "{e}");
        assert!(ApiKeys::new([""], "BEIT_API_KEY").is_err());
    }
}
