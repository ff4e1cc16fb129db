//! API keys: every endpoint but /health needs `Authorization: Bearer <key>`; a missing or wrong key is a 401.

mod common;

use beit_server::{ApiKeys, ServerConfig};
use common::*;
use hyper::Method;

const KEYS: [&str; 2] = ["k-alpha-0123456789", "k-beta-9876543210"];

async fn post_with(http: &Http, image: &str, auth: Option<&str>) -> Answer {
    let mut headers = vec![("content-type", "image/png")];
    headers.extend(auth.map(|a| ("authorization", a)));
    http.send_with(Method::POST, "/classify", &headers, image_bytes(image)).await.unwrap()
}

async fn get_with(http: &Http, path: &str, auth: &str) -> Answer {
    http.send_with(Method::GET, path, &[("authorization", auth)], Vec::new()).await.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keys_are_required_everywhere_but_health() {
    let model = model_dir("cls_single");
    let cfg = ServerConfig { api_keys: ApiKeys::new(KEYS, "test").unwrap(), ..config(&model) };
    let server = start(&model, cfg).await;
    let http = Http::new(&server);

    // Missing, wrong, a prefix, a longer one, another scheme: 401 with a JSON error and a Bearer challenge.
    let right = format!("Bearer {}", KEYS[0]);
    let prefix = format!("Bearer {}", &KEYS[0][..KEYS[0].len() - 1]);
    let longer = format!("Bearer {}0", KEYS[0]);
    let basic = format!("Basic {}", KEYS[0]);
    for auth in [None, Some("Bearer nope"), Some(prefix.as_str()), Some(longer.as_str()), Some(basic.as_str())] {
        // A small body: the refusal closes the connection without reading it.
        let a = post_with(&http, "gray4.png", auth).await;
        assert_eq!(a.status, 401, "{auth:?}: {}", a.text());
        assert_eq!(a.headers["www-authenticate"], "Bearer");
        assert_eq!(a.json()["error_type"], "unauthorized");
        let message = a.json()["error"].as_str().unwrap().to_string();
        assert!(!message.contains(KEYS[0]), "the key is echoed: {message}");
        let bearer = auth.is_some_and(|a| a.starts_with("Bearer"));
        let expected = if bearer { "not valid" } else { "requires an API key" };
        assert!(message.contains(expected), "{auth:?}: {message}");
    }
    for path in ["/info", "/metrics", "/openapi.json", "/nope"] {
        assert_eq!(http.get(path).await.status, 401, "{path}");
    }

    // Either key works, the scheme in any case; the answer is the model's.
    let expected = {
        let pipe = load_pipeline(&model).unwrap();
        let img = beit::processor::load_image(image_path("chelsea.png")).unwrap();
        // Through JSON text, as the server writes it (f32 scores in their shortest form).
        let text = serde_json::to_string(&pipe.classify(std::slice::from_ref(&img), 5).unwrap()[0]).unwrap();
        serde_json::from_str::<serde_json::Value>(&text).unwrap()
    };
    let second = format!("bearer {}", KEYS[1]);
    for auth in [right.as_str(), second.as_str()] {
        let a = post_with(&http, "chelsea.png", Some(auth)).await;
        assert_eq!(a.status, 200, "{}", a.text());
        assert_eq!(a.json(), expected);
    }
    let info = get_with(&http, "/info", &right).await;
    assert_eq!(info.status, 200);
    assert_eq!(info.json()["api_key_required"], true);
    assert!(!info.text().contains(KEYS[0]) && !info.text().contains(KEYS[1]), "a key on /info");
    let api = get_with(&http, "/openapi.json", &right).await.json();
    assert_eq!(api["components"]["securitySchemes"]["bearer"]["scheme"], "bearer");
    assert_eq!(api["paths"]["/health"]["get"]["security"], serde_json::json!([]));

    // /health is open, for load balancers.
    assert_eq!(http.get("/health").await.status, 200);
    let m = get_with(&http, "/metrics", &right).await.text();
    assert!(m.contains("beit_requests_total{endpoint=\"/classify\",status=\"401\"} 5\n"), "{m}");
    assert!(m.contains("beit_requests_total{endpoint=\"/classify\",status=\"200\"} 2\n"), "{m}");
    server.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_keys_the_server_is_open() {
    let model = model_dir("cls_single");
    let server = start(&model, config(&model)).await;
    let http = Http::new(&server);
    // A stray Authorization header is ignored.
    assert_eq!(post_with(&http, "chelsea.png", Some("Bearer whatever")).await.status, 200);
    assert_eq!(http.get("/info").await.json()["api_key_required"], false);
    server.shutdown().await.unwrap();
}
