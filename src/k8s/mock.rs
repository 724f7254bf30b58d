//! Test support: a scripted API server behind kube-rs's mock service (tower-test). Each test
//! lists the calls it expects, in order, with the reply to give; the server asserts method,
//! path and query of every request and returns the request bodies for the test to check.
//! A call can also be scripted to hang (an API server that takes the request and never
//! answers), for tests of timeouts; run those under tokio's paused clock.

use http::{Request, Response};
use kube::client::Body;
use kube::Client;

/// One expected call and its reply (`Null`: echo the request body).
pub struct Call {
    pub method: &'static str,
    pub path: String,
    /// A substring the query string must contain (e.g. `fieldManager=fusevol-agent`).
    pub query: Option<&'static str>,
    pub status: u16,
    pub reply: serde_json::Value,
    /// Take the request and never answer it.
    pub hang: bool,
}

impl Call {
    pub fn new(
        method: &'static str,
        path: impl Into<String>,
        status: u16,
        reply: serde_json::Value,
    ) -> Call {
        Call {
            method,
            path: path.into(),
            query: None,
            status,
            reply,
            hang: false,
        }
    }

    /// A call the server receives (and checks) but never answers.
    pub fn hang(method: &'static str, path: impl Into<String>) -> Call {
        Call {
            hang: true,
            ..Call::new(method, path, 0, serde_json::Value::Null)
        }
    }

    pub fn query(mut self, q: &'static str) -> Call {
        self.query = Some(q);
        self
    }
}

/// A client whose requests go to a scripted server answering `calls` in order. The handle
/// resolves to the request bodies (JSON, `Null` when empty) once every call was answered;
/// an unexpected request fails the test. Hanging calls stay unanswered for as long as the
/// runtime lives.
pub fn client(calls: Vec<Call>) -> (Client, tokio::task::JoinHandle<Vec<serde_json::Value>>) {
    let (service, mut handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
    let server = tokio::spawn(async move {
        let mut bodies = Vec::new();
        let mut unanswered = Vec::new();
        for call in calls {
            let (request, send) = handle.next_request().await.unwrap_or_else(|| {
                panic!("expected {} {}: no request came", call.method, call.path)
            });
            assert_eq!(
                request.method().as_str(),
                call.method,
                "method of {}",
                request.uri()
            );
            assert_eq!(request.uri().path(), call.path, "path");
            if let Some(q) = call.query {
                let query = request.uri().query().unwrap_or("");
                assert!(
                    query.contains(q),
                    "query {query:?} of {} lacks {q:?}",
                    call.path
                );
            }
            let bytes = request.into_body().collect_bytes().await.unwrap();
            bodies.push(if bytes.is_empty() {
                serde_json::Value::Null
            } else {
                serde_json::from_slice(&bytes).unwrap()
            });
            if call.hang {
                unanswered.push(send);
                continue;
            }
            // A `Null` reply echoes the request body (what a create returns).
            let reply = if call.reply.is_null() {
                bytes.to_vec()
            } else {
                serde_json::to_vec(&call.reply).unwrap()
            };
            let response = Response::builder()
                .status(call.status)
                .body(Body::from(reply))
                .unwrap();
            send.send_response(response);
        }
        if !unanswered.is_empty() {
            tokio::spawn(async move {
                let _unanswered = unanswered;
                std::future::pending::<()>().await
            });
        }
        bodies
    });
    (Client::new(service, "default"), server)
}

/// An API `Status` failure body with `code`.
pub fn status(code: u16, reason: &str) -> serde_json::Value {
    serde_json::json!({
        "kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
        "message": reason, "reason": reason, "code": code,
    })
}
