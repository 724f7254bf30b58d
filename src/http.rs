//! The agent's and controller's HTTP endpoint, served by hyper (HTTP/1.1): `GET /healthz`
//! (liveness: is the process doing its work, or stuck), `GET /readyz` (readiness: is it
//! serving what it should yet) and `GET /metrics` (the process's one registry, OpenMetrics
//! text). Probes and scrapers are all it serves.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;

/// What the endpoint serves.
pub trait Endpoints: Send + Sync + 'static {
    /// Liveness: `Ok` unless the process is stuck (served as 503 with the reason; kubelet
    /// restarts the container).
    fn health(&self) -> Result<(), String>;
    /// Readiness: `Ok` once the process serves what it should (served as 503 with what it
    /// still waits for; the pod counts as unavailable, e.g. for a rolling update).
    fn ready(&self) -> Result<(), String>;
    /// The OpenMetrics text exposition.
    fn metrics(&self) -> String;
}

/// A client that sends no complete request head within this is cut off.
const HEADER_TIMEOUT: Duration = Duration::from_secs(5);

/// Binds `addr` (so that a taken port fails at start) and serves on the current runtime.
pub async fn serve(addr: SocketAddr, endpoints: Arc<dyn Endpoints>) -> std::io::Result<SocketAddr> {
    let listener = TcpListener::bind(addr).await?;
    let local = listener.local_addr()?;
    tokio::spawn(async move {
        loop {
            let Ok((conn, _)) = listener.accept().await else {
                continue;
            };
            let endpoints = endpoints.clone();
            tokio::spawn(async move {
                let service = hyper::service::service_fn(move |req: Request<Incoming>| {
                    let response = respond(req.method(), req.uri().path(), endpoints.as_ref());
                    async move { Ok::<_, Infallible>(response) }
                });
                let served = hyper::server::conn::http1::Builder::new()
                    .timer(TokioTimer::new())
                    .header_read_timeout(HEADER_TIMEOUT)
                    .serve_connection(TokioIo::new(conn), service)
                    .await;
                if let Err(error) = served {
                    tracing::debug!(%error, "HTTP connection ended with an error");
                }
            });
        }
    });
    Ok(local)
}

/// The response to `method path`.
fn respond(method: &Method, path: &str, endpoints: &dyn Endpoints) -> Response<Full<Bytes>> {
    const TEXT: &str = "text/plain; charset=utf-8";
    const OPENMETRICS: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";
    let probe = |result: Result<(), String>| match result {
        Ok(()) => (StatusCode::OK, TEXT, "ok\n".to_string()),
        Err(e) => (StatusCode::SERVICE_UNAVAILABLE, TEXT, format!("{e}\n")),
    };
    let (status, content_type, body) = match (method, path) {
        (&Method::GET, "/healthz") => probe(endpoints.health()),
        (&Method::GET, "/readyz") => probe(endpoints.ready()),
        (&Method::GET, "/metrics") => (StatusCode::OK, OPENMETRICS, endpoints.metrics()),
        (&Method::GET, _) => (StatusCode::NOT_FOUND, TEXT, "not found\n".to_string()),
        _ => (
            StatusCode::METHOD_NOT_ALLOWED,
            TEXT,
            "method not allowed\n".to_string(),
        ),
    };
    let mut response = Response::new(Full::new(Bytes::from(body)));
    *response.status_mut() = status;
    response.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static(content_type),
    );
    response
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    struct Fixed {
        health: Result<(), String>,
        ready: Result<(), String>,
    }
    impl Endpoints for Fixed {
        fn health(&self) -> Result<(), String> {
            self.health.clone()
        }
        fn ready(&self) -> Result<(), String> {
            self.ready.clone()
        }
        fn metrics(&self) -> String {
            "# EOF\n".into()
        }
    }

    async fn get(addr: SocketAddr, request: &str) -> String {
        let mut c = tokio::net::TcpStream::connect(addr).await.unwrap();
        c.write_all(request.as_bytes()).await.unwrap();
        let mut out = String::new();
        c.read_to_string(&mut out).await.unwrap();
        out
    }

    #[tokio::test]
    async fn probes_and_metrics_answer_over_tcp() {
        let endpoints = Fixed {
            health: Ok(()),
            ready: Err("serving the last run's volumes".into()),
        };
        let addr = serve("127.0.0.1:0".parse().unwrap(), Arc::new(endpoints))
            .await
            .unwrap();
        for (request, want) in [
            ("GET /healthz HTTP/1.1", "HTTP/1.1 200 OK"),
            ("GET /readyz HTTP/1.1", "HTTP/1.1 503"),
            ("GET /readyz HTTP/1.1", "serving the last run's volumes"),
            ("GET /metrics?x=1 HTTP/1.1", "# EOF"),
            ("GET /metrics HTTP/1.1", "application/openmetrics-text"),
            ("GET /nope HTTP/1.1", "HTTP/1.1 404"),
            ("POST /healthz HTTP/1.1", "HTTP/1.1 405"),
        ] {
            let out = get(
                addr,
                &format!("{request}\r\nHost: x\r\nConnection: close\r\nContent-Length: 0\r\n\r\n"),
            )
            .await;
            assert!(out.contains(want), "{request}: {out}");
        }
    }

    #[tokio::test]
    async fn a_bad_request_is_refused_and_the_server_serves_on() {
        let endpoints = Fixed {
            health: Err("the volume loop last ran 400s ago".into()),
            ready: Ok(()),
        };
        let addr = serve("127.0.0.1:0".parse().unwrap(), Arc::new(endpoints))
            .await
            .unwrap();
        let out = get(addr, "NOT HTTP AT ALL\r\n\r\n").await;
        assert!(out.is_empty() || out.starts_with("HTTP/1.1 400"), "{out}");
        let out = get(addr, "GET /healthz HTTP/1.1\r\nConnection: close\r\n\r\n").await;
        assert!(out.starts_with("HTTP/1.1 503"), "{out}");
        assert!(
            out.ends_with("the volume loop last ran 400s ago\n"),
            "{out}"
        );
    }
}
