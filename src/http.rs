//! The agent's and controller's tiny HTTP endpoint: `GET /healthz` and `GET /metrics`
//! (Prometheus text). Plain HTTP/1.1 with `Connection: close`, enough for probes and scrapers,
//! with no web framework behind it.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

/// What the endpoint serves.
pub trait Endpoints: Send + Sync + 'static {
    /// `Ok` when healthy, else what is wrong (served as 503).
    fn health(&self) -> Result<(), String>;
    /// The Prometheus text exposition.
    fn metrics(&self) -> String;
}

/// Binds `addr` (so that a taken port fails at start) and serves on the current runtime.
pub async fn serve(addr: SocketAddr, endpoints: Arc<dyn Endpoints>) -> std::io::Result<SocketAddr> {
    let listener = TcpListener::bind(addr).await?;
    let local = listener.local_addr()?;
    tokio::spawn(async move {
        loop {
            let Ok((mut conn, _)) = listener.accept().await else {
                continue;
            };
            let endpoints = endpoints.clone();
            tokio::spawn(async move {
                let mut buf = vec![0u8; 4096];
                let mut len = 0;
                // Read until the end of the request head (or 4 KiB, or 5 s).
                let read = tokio::time::timeout(Duration::from_secs(5), async {
                    while len < buf.len() {
                        match conn.read(&mut buf[len..]).await {
                            Ok(0) | Err(_) => break,
                            Ok(n) => len += n,
                        }
                        if buf[..len].windows(4).any(|w| w == b"\r\n\r\n") {
                            break;
                        }
                    }
                })
                .await;
                if read.is_err() {
                    return;
                }
                let head = String::from_utf8_lossy(&buf[..len]);
                let response = respond(head.lines().next().unwrap_or(""), endpoints.as_ref());
                let _ = conn.write_all(response.as_bytes()).await;
                let _ = conn.shutdown().await;
            });
        }
    });
    Ok(local)
}

/// The whole HTTP response to a request line.
fn respond(request_line: &str, endpoints: &dyn Endpoints) -> String {
    let mut parts = request_line.split_whitespace();
    let (method, path) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
    let path = path.split('?').next().unwrap_or("");
    let (status, content_type, body) = match (method, path) {
        ("GET", "/healthz") => match endpoints.health() {
            Ok(()) => ("200 OK", "text/plain", "ok\n".to_string()),
            Err(e) => ("503 Service Unavailable", "text/plain", format!("{e}\n")),
        },
        ("GET", "/metrics") => (
            "200 OK",
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
            endpoints.metrics(),
        ),
        ("GET", _) => ("404 Not Found", "text/plain", "not found\n".to_string()),
        _ => (
            "405 Method Not Allowed",
            "text/plain",
            "method not allowed\n".to_string(),
        ),
    };
    format!(
        "HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Fixed(Result<(), String>);
    impl Endpoints for Fixed {
        fn health(&self) -> Result<(), String> {
            self.0.clone()
        }
        fn metrics(&self) -> String {
            "# EOF\n".into()
        }
    }

    #[tokio::test]
    async fn healthz_and_metrics_answer_over_tcp() {
        let addr = serve("127.0.0.1:0".parse().unwrap(), Arc::new(Fixed(Ok(()))))
            .await
            .unwrap();
        for (path, want) in [
            ("/healthz", "200 OK"),
            ("/metrics", "# EOF"),
            ("/nope", "404"),
        ] {
            let mut c = tokio::net::TcpStream::connect(addr).await.unwrap();
            c.write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\n\r\n").as_bytes())
                .await
                .unwrap();
            let mut out = String::new();
            c.read_to_string(&mut out).await.unwrap();
            assert!(out.contains(want), "{path}: {out}");
        }
    }

    #[test]
    fn unhealthy_is_503_with_the_reason() {
        let r = respond("GET /healthz HTTP/1.1", &Fixed(Err("no API".into())));
        assert!(r.starts_with("HTTP/1.1 503"));
        assert!(r.ends_with("no API\n"));
        let r = respond("POST /healthz HTTP/1.1", &Fixed(Ok(())));
        assert!(r.starts_with("HTTP/1.1 405"));
    }
}
