//! The OpenAPI 3 description of the server, written by hand.

use serde_json::{json, Value};

use crate::ServerConfig;

fn image_body() -> Value {
    json!({
        "required": true,
        "description": "The image (PNG, JPEG, WebP, BMP, TIFF or GIF): the raw bytes with any Content-Type other than \
            multipart or JSON; a multipart form (the first field with a filename, else the first field; an optional \
            `top_k` field); or JSON {\"inputs\": \"<base64>\"} (`image` is accepted for `inputs`; a data: URL too).",
        "content": {
            "application/octet-stream": {"schema": {"type": "string", "format": "binary"}},
            "image/*": {"schema": {"type": "string", "format": "binary"}},
            "multipart/form-data": {"schema": {"type": "object", "properties": {
                "file": {"type": "string", "format": "binary"},
                "top_k": {"type": "integer", "minimum": 1}
            }}},
            "application/json": {"schema": {"$ref": "#/components/schemas/JsonInput"}}
        }
    })
}

fn errors() -> Value {
    let e = |d: &str| json!({"description": d, "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}});
    json!({
        "400": e("Bad request: invalid JSON or base64, or an input the model refuses (`validation`), an image that does \
                  not decode (`invalid_image`), one above --max-image-pixels (`image_too_large`), or a task the model \
                  has no head for (`unsupported`)."),
        "401": e("The server requires an API key and the request had none, or not a valid one (`unauthorized`)."),
        "408": e("The body did not arrive within 60 s, or arrived slower than --min-body-rate after --body-grace-ms \
                  (`timeout`)."),
        "413": e("The body is larger than --max-body-bytes (`payload_too_large`)."),
        "429": e("The client's address already has --max-connections-per-client connections open \
                  (`too_many_connections`)."),
        "500": e("A fault in the server or the model, not in the request (`backend`): the server logged the cause under \
                  the answer's `request_id`."),
        "503": {
            "description": "The queue is full (`overloaded`), or the request waited in it longer than --max-queue-wait-ms \
                            (`queue_timeout`) — retry after the Retry-After header's seconds; or the model thread has \
                            stopped (`unhealthy`).",
            "headers": {"Retry-After": {"schema": {"type": "integer"}}},
            "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}
        }
    })
}

fn with_errors(ok: Value) -> Value {
    let mut r = errors();
    r["200"] = ok;
    r
}

/// `/segment`'s query parameters; the same names in the JSON body's `parameters` or as form fields win.
fn segment_params() -> Value {
    let pair = |name: &str, what: &str| {
        json!({"name": name, "in": "query", "required": false, "description": what,
            "schema": {"type": "string", "pattern": "^[0-9]+(,[0-9]+)?$"}})
    };
    json!([
        {"name": "mode", "in": "query", "required": false,
         "description": "`whole` (default): the image resized to the model's input, as transformers' pipeline. `slide`: \
            mmseg's sliding window over the image at its own size (or rescaled by `scale`); the mask is at the image's size.",
         "schema": {"type": "string", "enum": ["whole", "slide"], "default": "whole"}},
        pair("crop", "slide: window HEIGHT,WIDTH (one number: square; default the model's image_size)."),
        pair("stride", "slide: step HEIGHT,WIDTH between windows (default two thirds of the crop)."),
        pair("scale", "slide: rescale first, keeping the aspect ratio, to fit LONG,SHORT edge bounds (mmseg's keep-ratio \
            Resize; BEiT's ADE20K test scale is 2048,512)."),
    ])
}

/// The document for a server with these settings.
pub fn document(c: &ServerConfig) -> Value {
    let top_k = json!({"name": "top_k", "in": "query", "required": false,
        "description": "How many classes to return (default 5). A `top_k` in the JSON body or form wins.",
        "schema": {"type": "integer", "minimum": 1, "default": 5}});
    let mut doc = json!({
        "openapi": "3.0.3",
        "info": {
            "title": "beit serve",
            "version": env!("CARGO_PKG_VERSION"),
            "description": format!(
                "BEiT inference with dynamic batching: requests that arrive together run as one batch (up to {} images, \
                 waiting at most {} ms). Answers have the shapes of the Hugging Face Inference API. Every answer carries an \
                 `x-request-id` header: the client's if it sent one of 1 to 128 letters, digits and `-_.:`, else a fresh \
                 one; error bodies repeat it as `request_id`.",
                c.max_batch_size, c.max_batch_delay.as_millis())
        },
        "paths": {
            "/classify": {"post": {
                "summary": "Image classification: the top_k classes with their scores, best first.",
                "parameters": [top_k],
                "requestBody": image_body(),
                "responses": with_errors(json!({"description": "Classes and scores (softmax; sigmoid for multi-label models).",
                    "content": {"application/json": {"schema": {"type": "array", "items": {"$ref": "#/components/schemas/Prediction"}}}}}))
            }},
            "/segment": {"post": {
                "summary": "Semantic segmentation: one entry per class present in the image.",
                "description": "Entries are in ascending class id. `score` is the class's share of the image's pixels \
                    (the image-segmentation pipeline gives no score for semantic segmentation); `mask` is a base64 PNG, \
                    8-bit grayscale at the image's size, 255 where the pixel is that class and 0 elsewhere.",
                "parameters": segment_params(),
                "requestBody": image_body(),
                "responses": with_errors(json!({"description": "Classes present with pixel shares and masks.",
                    "content": {"application/json": {"schema": {"type": "array", "items": {"$ref": "#/components/schemas/Segment"}}}}}))
            }},
            "/embed": {"post": {
                "summary": "Feature extraction: the backbone's pooled vector (hidden_size floats).",
                "description": "The pooler's output where the model has one (mean pooling + layer norm, or the CLS token); \
                    for checkpoints without a pooler (masked-image-modeling, segmentation), the mean of the patch tokens \
                    or the CLS token as the config says.",
                "requestBody": image_body(),
                "responses": with_errors(json!({"description": "The vector.",
                    "content": {"application/json": {"schema": {"type": "array", "items": {"type": "number"}}}}}))
            }},
            "/health": {"get": {"summary": "200 while the model thread runs, else 503.",
                "responses": {"200": {"description": "Healthy", "content": {"application/json": {"schema": {"type": "object"}}}},
                              "503": {"description": "Unhealthy"}}}},
            "/info": {"get": {"summary": "The model (id, architecture, tasks, labels, config summary) and the server's limits.",
                "responses": {"200": {"description": "Info", "content": {"application/json": {"schema": {"type": "object"}}}}}}},
            "/metrics": {"get": {"summary": "Prometheus metrics (text format 0.0.4).",
                "responses": {"200": {"description": "Metrics", "content": {"text/plain": {"schema": {"type": "string"}}}}}}},
            "/openapi.json": {"get": {"summary": "This document.",
                "responses": {"200": {"description": "OpenAPI 3", "content": {"application/json": {"schema": {"type": "object"}}}}}}}
        },
        "components": {"schemas": {
            "JsonInput": {"type": "object", "required": ["inputs"], "properties": {
                "inputs": {"type": "string", "description": "The image, base64 (standard or URL-safe, padding optional) or a data: URL."},
                "image": {"type": "string", "description": "Accepted in place of `inputs`."},
                "parameters": {"type": "object", "properties": {"top_k": {"type": "integer", "minimum": 1}}},
                "top_k": {"type": "integer", "minimum": 1}
            }},
            "Prediction": {"type": "object", "required": ["label", "score"], "properties": {
                "label": {"type": "string"}, "score": {"type": "number"}}},
            "Segment": {"type": "object", "required": ["label", "score", "mask"], "properties": {
                "label": {"type": "string"},
                "score": {"type": "number", "description": "The class's share of the image's pixels, in [0, 1]."},
                "mask": {"type": "string", "format": "byte", "description": "Base64 PNG (L8): 255 where the pixel is this class."}}},
            "Error": {"type": "object", "required": ["error", "error_type"], "properties": {
                "error": {"type": "string"},
                "request_id": {"type": "string", "description": "Names the request in the server's log."},
                "error_type": {"type": "string", "enum": ["validation", "invalid_image", "image_too_large", "unsupported",
                    "unauthorized", "not_found", "method_not_allowed", "payload_too_large", "timeout", "too_many_connections", "overloaded", "queue_timeout", "unhealthy", "backend"]}}}
        }}
    });
    if !c.api_keys.is_empty() {
        doc["security"] = json!([{"bearer": []}]);
        doc["components"]["securitySchemes"] =
            json!({"bearer": {"type": "http", "scheme": "bearer", "description": "One of the server's API keys."}});
        doc["paths"]["/health"]["get"]["security"] = json!([]);
    }
    doc
}
