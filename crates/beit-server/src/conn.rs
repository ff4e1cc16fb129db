//! Connections: the accept loop, with a cap on connections per client address and a deadline for a request's
//! headers, so that clients that connect and stall cannot take what others need. (Bodies have their own minimum
//! rate, in [`crate::input`]; a request takes a queue slot only once its image is decoded, in [`crate::routes`].)

use std::collections::HashMap;
use std::future::Future;
use std::net::IpAddr;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use hyper::server::conn::http1;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use hyper_util::service::TowerToHyperService;
use tokio::net::{TcpListener, TcpStream};

use crate::error::{ApiError, ErrorType};
use crate::metrics::Metrics;

/// Open connections per client address, against a cap.
#[derive(Debug)]
pub struct Connections {
    open: Mutex<HashMap<IpAddr, usize>>,
    max_per_client: usize,
    metrics: Arc<Metrics>,
}

/// One open connection, counted until dropped.
#[derive(Debug)]
pub struct Counted {
    ip: IpAddr,
    table: Arc<Connections>,
}

impl Connections {
    /// A table allowing `max_per_client` connections per address.
    pub fn new(max_per_client: usize, metrics: Arc<Metrics>) -> Arc<Self> {
        Arc::new(Connections { open: Mutex::new(HashMap::new()), max_per_client, metrics })
    }

    /// Counts a connection from `ip`, or `None` if that address already has its share.
    pub fn open(self: &Arc<Self>, ip: IpAddr) -> Option<Counted> {
        let mut open = self.open.lock().unwrap_or_else(|e| e.into_inner());
        let n = open.entry(ip).or_default();
        if *n >= self.max_per_client {
            return None;
        }
        *n += 1;
        self.metrics.connections.fetch_add(1, Ordering::SeqCst);
        Some(Counted { ip, table: self.clone() })
    }

    /// Open connections from `ip`.
    pub fn from(&self, ip: IpAddr) -> usize {
        self.open.lock().unwrap_or_else(|e| e.into_inner()).get(&ip).copied().unwrap_or(0)
    }
}

impl Drop for Counted {
    fn drop(&mut self) {
        let mut open = self.table.open.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(n) = open.get_mut(&self.ip) {
            *n -= 1;
            if *n == 0 {
                open.remove(&self.ip);
            }
        }
        self.table.metrics.connections.fetch_sub(1, Ordering::SeqCst);
    }
}

/// How long a refused connection gets to take its answer before it is closed.
const REFUSAL_WRITE_TIMEOUT: Duration = Duration::from_secs(1);

/// Answers a connection over its address's cap with a 429 and closes it, discarding what it sent (closing with
/// unread data would reset the connection, and the client could lose the answer).
async fn refuse(stream: TcpStream, max_per_client: usize) {
    let e = ApiError::new(
        ErrorType::TooManyConnections,
        format!(
            "this address has {max_per_client} connections open, the server's limit (--max-connections-per-client)"
        ),
    );
    let body = e.body().to_string();
    let status = e.status();
    let head = format!(
        "HTTP/1.1 {} {}\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n",
        status.as_u16(),
        status.canonical_reason().unwrap_or(""),
        body.len()
    );
    let answer = [head.as_bytes(), body.as_bytes()].concat();
    // ok to ignore: a client that does not take its refusal in time is closed all the same.
    let _ = tokio::time::timeout(REFUSAL_WRITE_TIMEOUT, async {
        let mut rest = &answer[..];
        while !rest.is_empty() {
            stream.writable().await?;
            match stream.try_write(rest) {
                Ok(n) => rest = &rest[n..],
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                Err(e) => return Err(e),
            }
        }
        let std = stream.into_std()?;
        std.shutdown(std::net::Shutdown::Write)?;
        let stream = TcpStream::from_std(std)?;
        // Drain until the client closes (or the timeout), so the close is orderly.
        let mut sink = [0u8; 4096];
        loop {
            stream.readable().await?;
            match stream.try_read(&mut sink) {
                Ok(0) => return Ok(()),
                Ok(_) => {}
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                Err(e) => return Err(e),
            }
        }
    })
    .await;
}

/// Serves `app` on `listener` until `stop` completes, then stops accepting and waits for every connection to
/// finish its requests (idle keep-alive connections are closed). A request's headers must arrive within
/// `header_timeout` or its connection is closed.
pub async fn serve(
    listener: TcpListener,
    app: Router,
    connections: Arc<Connections>,
    header_timeout: Duration,
    stop: impl Future<Output = ()>,
) {
    let mut builder = http1::Builder::new();
    builder.timer(TokioTimer::new()).header_read_timeout(header_timeout);
    let graceful = GracefulShutdown::new();
    tokio::pin!(stop);
    loop {
        let (stream, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    // Out of file descriptors and the like: wait a moment rather than spin.
                    tracing::warn!("accepting a connection: {e}");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = &mut stop => break,
        };
        let Some(counted) = connections.open(peer.ip()) else {
            connections.metrics.reject(ErrorType::TooManyConnections.as_str());
            tokio::spawn(refuse(stream, connections.max_per_client));
            continue;
        };
        // ok to ignore: a socket option; without it small answers may wait for Nagle's algorithm.
        let _ = stream.set_nodelay(true);
        let conn = builder.serve_connection(TokioIo::new(stream), TowerToHyperService::new(app.clone()));
        let conn = graceful.watch(conn);
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                tracing::debug!("connection from {peer}: {e}");
            }
            drop(counted);
        });
    }
    drop(listener);
    graceful.shutdown().await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn connections_are_capped_per_address() {
        let table = Connections::new(2, Arc::new(Metrics::new()));
        let (a, b): (IpAddr, IpAddr) = ("10.0.0.1".parse().unwrap(), "10.0.0.2".parse().unwrap());
        let first = table.open(a).unwrap();
        let _second = table.open(a).unwrap();
        assert!(table.open(a).is_none(), "a third from the same address");
        let _other = table.open(b).unwrap();
        drop(first);
        assert_eq!(table.from(a), 1);
        assert!(table.open(a).is_some(), "room again once one closed");
        assert_eq!(table.metrics.connections.load(Ordering::SeqCst), 2, "open: the second and the other");
    }
}
