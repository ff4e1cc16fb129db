//! The web page at `/`: plain HTML, CSS and JS built into the binary. Loading it needs no API key (a browser
//! cannot send one before the page asks for it); every API call the page makes needs one like any client's.

use axum::http::header;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;

/// The page's paths: exactly these are open without a key (see [`crate::auth`]).
pub const INDEX: &str = "/";
pub const CSS: &str = "/page.css";
pub const JS: &str = "/page.js";

const INDEX_HTML: &str = include_str!("page/index.html");
const PAGE_CSS: &str = include_str!("page/page.css");
const PAGE_JS: &str = include_str!("page/page.js");

/// Only the server's own scripts, styles and API; images also from `data:` (segmentation masks) and `blob:` (the
/// user's own image). No inline script or style, no plugins, no framing, no form posts elsewhere.
pub const CONTENT_SECURITY_POLICY: &str = "default-src 'self'; img-src 'self' data: blob:; object-src 'none'; \
                                           base-uri 'none'; form-action 'none'; frame-ancestors 'none'";

/// The page's routes, for [`crate::routes::router`].
pub fn routes<S: Clone + Send + Sync + 'static>() -> Router<S> {
    Router::new()
        .route(INDEX, get(|| async { asset("text/html; charset=utf-8", INDEX_HTML) }))
        .route(CSS, get(|| async { asset("text/css; charset=utf-8", PAGE_CSS) }))
        .route(JS, get(|| async { asset("text/javascript; charset=utf-8", PAGE_JS) }))
}

/// One of the page's files with its headers. `no-cache`: the files change with the binary, and a browser that kept
/// an old script beside a new page would break; they are small, so revalidating every time costs little.
fn asset(content_type: &'static str, body: &'static str) -> Response {
    let headers = [
        (header::CONTENT_TYPE, content_type),
        (header::CONTENT_SECURITY_POLICY, CONTENT_SECURITY_POLICY),
        (header::CACHE_CONTROL, "no-cache"),
        (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
        (header::REFERRER_POLICY, "no-referrer"),
    ];
    (headers, body).into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every `src="..."`/`href="..."` in the HTML.
    fn references(html: &str) -> Vec<&str> {
        let mut out = Vec::new();
        for attr in ["src=\"", "href=\""] {
            for (at, _) in html.match_indices(attr) {
                let rest = &html[at + attr.len()..];
                out.push(rest.split('"').next().unwrap());
            }
        }
        out
    }

    #[test]
    fn the_page_references_only_its_own_files() {
        let refs = references(INDEX_HTML);
        assert!(refs.contains(&CSS) && refs.contains(&JS), "{refs:?}");
        for r in refs {
            assert!(r == CSS || r == JS || r.starts_with("data:"), "the page refers to {r}, which is not served");
        }
        // No inline script or style: the policy would block it.
        assert!(!INDEX_HTML.contains("<script>") && !INDEX_HTML.contains("<style") && !INDEX_HTML.contains("style="));
        assert!(CONTENT_SECURITY_POLICY.starts_with("default-src 'self';"));
    }
}
