//! The image and parameters of a request: raw bytes, a multipart form, or JSON `{"inputs": "<base64>"}`.

use std::pin::Pin;
use std::time::{Duration, Instant};

use axum::body::{Body, Bytes, HttpBody};
use axum::extract::{FromRequest, Multipart, Request};
use axum::http::header;
use base64::alphabet;
use base64::engine::{DecodePaddingMode, GeneralPurpose, GeneralPurposeConfig};
use base64::Engine;
use serde_json::Value;

use crate::error::{ApiError, ErrorType};

/// A request's image bytes and the parameters that came with them.
#[derive(Debug, Default)]
pub struct Input {
    pub image: Bytes,
    /// From JSON (`parameters.top_k` or `top_k`) or a form field `top_k`.
    pub top_k: Option<usize>,
    /// `/segment`'s `mode`, `crop`, `stride` and `scale`, from the same places.
    pub segment: SegmentParams,
}

/// `/segment`'s parameters as a request gave them (JSON `parameters`, form fields or the query string).
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct SegmentParams {
    /// `whole` or `slide`.
    pub mode: Option<String>,
    /// Window height and width.
    pub crop: Option<(usize, usize)>,
    /// Step height and width.
    pub stride: Option<(usize, usize)>,
    /// Longest and shortest edge to rescale to.
    pub scale: Option<(usize, usize)>,
}

impl SegmentParams {
    /// Names of the segmentation parameters a form or JSON body may carry.
    pub const NAMES: [&'static str; 4] = ["mode", "crop", "stride", "scale"];

    /// Sets parameter `name` from a JSON value: `mode` a string; the others two positive integers as
    /// `[a, b]`, `"a,b"`, or one integer for both.
    pub fn set(&mut self, name: &str, v: &Value) -> Result<(), ApiError> {
        if name == "mode" {
            let Some(m) = v.as_str() else {
                return Err(ApiError::validation(format!("`mode` must be \"whole\" or \"slide\", found {v}")));
            };
            self.mode = Some(m.to_string());
            return Ok(());
        }
        let bad = || {
            ApiError::validation(format!(
                "`{name}` must be two positive integers ([a, b] or \"a,b\") or one, found {v}"
            ))
        };
        let positive = |x: &Value| x.as_u64().filter(|&n| n >= 1).map(|n| n.min(usize::MAX as u64) as usize);
        let pair = match v {
            Value::Array(a) if a.len() == 2 => (positive(&a[0]).ok_or_else(bad)?, positive(&a[1]).ok_or_else(bad)?),
            Value::String(t) => {
                let t = t.trim().trim_start_matches('[').trim_end_matches(']');
                let parts: Vec<Option<usize>> =
                    t.split(',').map(|p| p.trim().parse::<usize>().ok().filter(|&n| n >= 1)).collect();
                match parts[..] {
                    [Some(a)] => (a, a),
                    [Some(a), Some(b)] => (a, b),
                    _ => return Err(bad()),
                }
            }
            other => positive(other).map(|n| (n, n)).ok_or_else(bad)?,
        };
        match name {
            "crop" => self.crop = Some(pair),
            "stride" => self.stride = Some(pair),
            _ => self.scale = Some(pair),
        }
        Ok(())
    }

    /// Whether any parameter was given.
    pub fn is_empty(&self) -> bool {
        *self == SegmentParams::default()
    }

    /// Fills what `self` lacks from `other` (the body's parameters win over the query string's).
    pub fn or(self, other: SegmentParams) -> SegmentParams {
        SegmentParams {
            mode: self.mode.or(other.mode),
            crop: self.crop.or(other.crop),
            stride: self.stride.or(other.stride),
            scale: self.scale.or(other.scale),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BodyKind {
    Raw,
    Json,
    Multipart,
}

pub fn body_kind(content_type: Option<&str>) -> BodyKind {
    let ct = content_type.unwrap_or("").trim().to_ascii_lowercase();
    let essence = ct.split(';').next().unwrap_or("").trim();
    if essence.starts_with("multipart/") {
        BodyKind::Multipart
    } else if essence == "application/json" || essence.ends_with("+json") {
        BodyKind::Json
    } else {
        BodyKind::Raw
    }
}

fn too_large(limit: usize) -> ApiError {
    ApiError::new(
        ErrorType::PayloadTooLarge,
        format!("the body is larger than the server's limit of {limit} bytes (--max-body-bytes)"),
    )
    .closing()
}

/// How a request's body must arrive.
#[derive(Debug, Clone, Copy)]
pub struct BodyLimits {
    /// Largest body, bytes (413 above).
    pub max_bytes: usize,
    /// After `grace`, the body must keep arriving at this many bytes per second on average (408 otherwise);
    /// 0: no minimum rate.
    pub min_rate: u64,
    /// Time a body may take before the rate counts: `grace + received / min_rate` is its deadline so far.
    pub grace: Duration,
}

impl BodyLimits {
    /// No limit but the size (tests).
    pub fn max_bytes(max_bytes: usize) -> Self {
        BodyLimits { max_bytes, min_rate: 0, grace: BODY_TIMEOUT }
    }

    /// When the next bytes must have arrived, given `received` so far since `started`; `None`: no deadline.
    fn deadline(&self, started: Instant, received: usize) -> Option<Instant> {
        if self.min_rate == 0 {
            return None;
        }
        let allowed = Duration::from_millis((received as u64).saturating_mul(1000) / self.min_rate);
        // Past what an Instant can hold: no deadline but the overall BODY_TIMEOUT.
        started.checked_add(self.grace)?.checked_add(allowed)
    }
}

/// Reads the whole body, refusing (413) as soon as it passes `limits.max_bytes` — from Content-Length when the
/// client sends one, else while streaming — and (408) as soon as it falls behind `limits.min_rate`.
pub async fn read_body(body: Body, content_length: Option<u64>, limits: &BodyLimits) -> Result<Bytes, ApiError> {
    let limit = limits.max_bytes;
    if content_length.is_some_and(|n| n > limit as u64) {
        return Err(too_large(limit));
    }
    let mut body = body;
    let mut buf: Vec<u8> = Vec::with_capacity(content_length.map(|n| n as usize).unwrap_or(0).min(limit));
    let started = Instant::now();
    loop {
        let next = std::future::poll_fn(|cx| Pin::new(&mut body).poll_frame(cx));
        let frame = match limits.deadline(started, buf.len()) {
            None => next.await,
            Some(deadline) => match tokio::time::timeout_at(deadline.into(), next).await {
                Ok(frame) => frame,
                Err(_) => return Err(too_slow(buf.len(), started.elapsed(), limits)),
            },
        };
        let Some(frame) = frame else { break };
        let frame = frame.map_err(|e| ApiError::validation(format!("reading the body: {e}")).closing())?;
        if let Ok(data) = frame.into_data() {
            if buf.len() + data.len() > limit {
                return Err(too_large(limit));
            }
            buf.extend_from_slice(&data);
        }
    }
    Ok(Bytes::from(buf))
}

fn too_slow(received: usize, elapsed: Duration, limits: &BodyLimits) -> ApiError {
    let message = format!(
        "the body arrived too slowly: {received} bytes in {:.1} s, expected at least {} bytes/s after the first {:.1} s \
         (--min-body-rate)",
        elapsed.as_secs_f64(),
        limits.min_rate,
        limits.grace.as_secs_f64()
    );
    ApiError::new(ErrorType::Timeout, message).closing()
}

/// How long a request may take to send its body, however fast it sends.
pub const BODY_TIMEOUT: Duration = Duration::from_secs(60);

/// The image and parameters of a request whose body arrives within `limits`.
pub async fn parse(req: Request, limits: &BodyLimits) -> Result<Input, ApiError> {
    let content_type = req.headers().get(header::CONTENT_TYPE).and_then(|v| v.to_str().ok()).map(str::to_owned);
    let content_length = req
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u64>().ok());
    let (parts, body) = req.into_parts();
    let bytes = tokio::time::timeout(BODY_TIMEOUT, read_body(body, content_length, limits)).await.map_err(|_| {
        ApiError::new(ErrorType::Timeout, format!("the body did not arrive within {} s", BODY_TIMEOUT.as_secs()))
            .closing()
    })??;
    match body_kind(content_type.as_deref()) {
        BodyKind::Raw => Ok(Input { image: bytes, ..Input::default() }),
        BodyKind::Json => parse_json(&bytes),
        BodyKind::Multipart => parse_multipart(Request::from_parts(parts, Body::from(bytes))).await,
    }
}

fn base64_engine() -> GeneralPurpose {
    GeneralPurpose::new(
        &alphabet::STANDARD,
        GeneralPurposeConfig::new().with_decode_padding_mode(DecodePaddingMode::Indifferent),
    )
}

fn base64_url_engine() -> GeneralPurpose {
    GeneralPurpose::new(
        &alphabet::URL_SAFE,
        GeneralPurposeConfig::new().with_decode_padding_mode(DecodePaddingMode::Indifferent),
    )
}

/// Base64 (standard or URL-safe, padded or not, whitespace ignored), optionally as a `data:` URL.
pub fn decode_base64(s: &str) -> Result<Vec<u8>, ApiError> {
    let s = s.trim();
    let s = match s.strip_prefix("data:") {
        Some(rest) => match rest.split_once(',') {
            Some((meta, data)) if meta.ends_with(";base64") => data,
            _ => return Err(ApiError::validation("a data: URL must be base64 (data:<type>;base64,<data>)")),
        },
        None => s,
    };
    let compact: String = s.chars().filter(|c| !c.is_ascii_whitespace()).collect();
    base64_engine()
        .decode(&compact)
        .or_else(|_| base64_url_engine().decode(&compact))
        .map_err(|e| ApiError::validation(format!("`inputs` is not valid base64: {e}")))
}

fn parse_top_k(v: &Value) -> Result<usize, ApiError> {
    v.as_u64()
        .filter(|&k| k >= 1)
        .map(|k| k.min(usize::MAX as u64) as usize)
        .ok_or_else(|| ApiError::validation(format!("`top_k` must be an integer of at least 1, found {v}")))
}

pub fn parse_json(bytes: &[u8]) -> Result<Input, ApiError> {
    let v: Value =
        serde_json::from_slice(bytes).map_err(|e| ApiError::validation(format!("the body is not valid JSON: {e}")))?;
    let Value::Object(map) = v else {
        return Err(ApiError::validation(r#"expected a JSON object {"inputs": "<base64 image>"}"#));
    };
    let data = match map.get("inputs").or_else(|| map.get("image")) {
        Some(Value::String(s)) => decode_base64(s)?,
        Some(other) => {
            return Err(ApiError::validation(format!("`inputs` must be a base64 string, found {}", kind(other))))
        }
        None => return Err(ApiError::validation(r#"missing `inputs`: expected {"inputs": "<base64 image>"}"#)),
    };
    let param = |name: &str| match map.get("parameters").and_then(|p| p.get(name)).or_else(|| map.get(name)) {
        None | Some(Value::Null) => None,
        Some(v) => Some(v),
    };
    let top_k = param("top_k").map(parse_top_k).transpose()?;
    let mut segment = SegmentParams::default();
    for name in SegmentParams::NAMES {
        if let Some(v) = param(name) {
            segment.set(name, v)?;
        }
    }
    Ok(Input { image: Bytes::from(data), top_k, segment })
}

fn kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

/// The first file field (a field with a filename; else the first field not named as a parameter), `top_k` and
/// the segmentation parameters.
async fn parse_multipart(req: Request) -> Result<Input, ApiError> {
    let mut form = Multipart::from_request(req, &())
        .await
        .map_err(|e| ApiError::validation(format!("invalid multipart form: {}", e.body_text())))?;
    let mut file: Option<Bytes> = None;
    let mut other: Option<Bytes> = None;
    let mut top_k = None;
    let mut segment = SegmentParams::default();
    loop {
        let field = match form.next_field().await {
            Ok(Some(f)) => f,
            Ok(None) => break,
            Err(e) => return Err(ApiError::validation(format!("invalid multipart form: {}", e.body_text()))),
        };
        let name = field.name().unwrap_or("").to_string();
        let is_file = field.file_name().is_some();
        let data = field
            .bytes()
            .await
            .map_err(|e| ApiError::validation(format!("invalid multipart form: {}", e.body_text())))?;
        if name == "top_k" && !is_file {
            let text = std::str::from_utf8(&data).unwrap_or("").trim();
            let k: Value = serde_json::from_str(text).unwrap_or(Value::String(text.to_string()));
            top_k = Some(parse_top_k(&k)?);
        } else if SegmentParams::NAMES.contains(&name.as_str()) && !is_file {
            segment.set(&name, &Value::String(std::str::from_utf8(&data).unwrap_or("").to_string()))?;
        } else if is_file && file.is_none() {
            file = Some(data);
        } else if other.is_none() {
            other = Some(data);
        }
    }
    match file.or(other) {
        Some(image) => Ok(Input { image, top_k, segment }),
        None => Err(ApiError::validation("the multipart form has no file field")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kinds() {
        assert_eq!(body_kind(Some("multipart/form-data; boundary=x")), BodyKind::Multipart);
        assert_eq!(body_kind(Some("Application/JSON; charset=utf-8")), BodyKind::Json);
        assert_eq!(body_kind(Some("application/vnd.api+json")), BodyKind::Json);
        assert_eq!(body_kind(Some("image/png")), BodyKind::Raw);
        assert_eq!(body_kind(Some("application/octet-stream")), BodyKind::Raw);
        assert_eq!(body_kind(None), BodyKind::Raw);
    }

    #[test]
    fn json_inputs() {
        let i = parse_json(br#"{"inputs": "aGVsbG8=", "parameters": {"top_k": 2}}"#).unwrap();
        assert_eq!(&i.image[..], b"hello");
        assert_eq!(i.top_k, Some(2));
        let i = parse_json(br#"{"image": "data:image/png;base64,aGVsbG8", "top_k": 3}"#).unwrap();
        assert_eq!(&i.image[..], b"hello");
        assert_eq!(i.top_k, Some(3));
        let i = parse_json(br#"{"inputs": "_-8"}"#).unwrap(); // URL-safe alphabet
        assert_eq!(&i.image[..], &[0xFF, 0xEF]);
        for bad in [
            &br#"{"inputs": 3}"#[..],
            br#"{"input": "aGVsbG8="}"#,
            br#"["aGVsbG8="]"#,
            br#"{"inputs": "not base64!!"}"#,
            br#"{"inputs": "aGVsbG8=", "top_k": 0}"#,
            br#"{"inputs": "aGVsbG8=", "top_k": "x"}"#,
            b"{not json",
        ] {
            let e = parse_json(bad).unwrap_err();
            assert_eq!(e.kind, ErrorType::Validation, "{}", String::from_utf8_lossy(bad));
        }
    }

    #[tokio::test]
    async fn body_limit() {
        let ten = BodyLimits::max_bytes(10);
        let b = read_body(Body::from(vec![0u8; 10]), None, &ten).await.unwrap();
        assert_eq!(b.len(), 10);
        let e = read_body(Body::from(vec![0u8; 11]), None, &ten).await.unwrap_err();
        assert_eq!(e.kind, ErrorType::PayloadTooLarge);
        let e = read_body(Body::from(vec![0u8; 1]), Some(11), &ten).await.unwrap_err();
        assert_eq!(e.kind, ErrorType::PayloadTooLarge);
    }

    #[test]
    fn the_deadline_grows_with_what_arrived() {
        let limits = BodyLimits { max_bytes: 1 << 20, min_rate: 1000, grace: Duration::from_millis(100) };
        let t = Instant::now();
        assert_eq!(limits.deadline(t, 0), Some(t + Duration::from_millis(100)));
        assert_eq!(limits.deadline(t, 500), Some(t + Duration::from_millis(600)));
        assert_eq!(BodyLimits::max_bytes(10).deadline(t, 500), None, "no minimum rate");
    }

    #[tokio::test]
    async fn multipart_first_file_field() {
        let body = "--XX\r\nContent-Disposition: form-data; name=\"top_k\"\r\n\r\n2\r\n\
                    --XX\r\nContent-Disposition: form-data; name=\"note\"\r\n\r\nhi\r\n\
                    --XX\r\nContent-Disposition: form-data; name=\"file\"; filename=\"a.png\"\r\n\
                    Content-Type: image/png\r\n\r\nPNGDATA\r\n--XX--\r\n";
        let req = Request::builder()
            .header(header::CONTENT_TYPE, "multipart/form-data; boundary=XX")
            .body(Body::from(body))
            .unwrap();
        let i = parse(req, &BodyLimits::max_bytes(1 << 20)).await.unwrap();
        assert_eq!(&i.image[..], b"PNGDATA");
        assert_eq!(i.top_k, Some(2));
        let req = Request::builder()
            .header(header::CONTENT_TYPE, "multipart/form-data; boundary=XX")
            .body(Body::from("garbage"))
            .unwrap();
        assert_eq!(parse(req, &BodyLimits::max_bytes(1 << 20)).await.unwrap_err().kind, ErrorType::Validation);
    }
}
