//! One connection's bytes as hyper sees them: hyper's own bare answers to requests it cannot parse (400, 414, 431, sent with an empty body before any handler runs) are rewritten into OperationOutcomes and reported for audit, and such a connection is closed gracefully.
//!
//! hyper offers no hook for those answers, so they are recognised on the way out: a write that is
//! exactly one response head with status 400, 414 or 431 and `content-length: 0`. The gateway's own
//! error responses always carry an OperationOutcome body, so they never match.

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use axum::http::StatusCode;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use crate::outcome::{Issue, IssueCode, operation_outcome};

/// After a rewritten refusal, how long and how much of the rest of the request is read and discarded
/// before closing, so the client reads the answer instead of a reset.
const LINGER: Duration = Duration::from_secs(2);
const LINGER_BYTES: usize = 4 * 1024 * 1024;

/// Called with the status of each rewritten refusal (the server audits it).
pub type OnRefusal = Box<dyn Fn(u16) + Send + Sync>;

/// The I/O of one connection, with protocol refusals rewritten.
pub struct GuardedIo<IO> {
    inner: IO,
    /// Bytes of a rewritten answer still to be written.
    pending: Vec<u8>,
    written: usize,
    /// Set once a refusal was rewritten: the connection ends after it, lingering on reads first.
    linger: Option<(Pin<Box<tokio::time::Sleep>>, usize)>,
    refused: bool,
    on_refusal: OnRefusal,
    /// Whether bytes arrived since the last answer was written: a request is part-way in (the server
    /// tells a slow request head from an idle keep-alive connection by it).
    pub unanswered: Arc<AtomicBool>,
}

impl<IO> GuardedIo<IO> {
    pub fn new(inner: IO, on_refusal: OnRefusal) -> GuardedIo<IO> {
        GuardedIo { inner, pending: Vec::new(), written: 0, linger: None, refused: false, on_refusal, unanswered: Arc::new(AtomicBool::new(false)) }
    }
}

impl<IO: AsyncWrite + Unpin> GuardedIo<IO> {
    /// Writes what is pending of a rewritten answer; ready when nothing is left.
    fn poll_pending(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while self.written < self.pending.len() {
            let n = std::task::ready!(Pin::new(&mut self.inner).poll_write(cx, &self.pending[self.written..]))?;
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            self.written += n;
        }
        self.pending.clear();
        self.written = 0;
        Poll::Ready(Ok(()))
    }
}

impl<IO: AsyncRead + Unpin> AsyncRead for GuardedIo<IO> {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let result = std::task::ready!(Pin::new(&mut self.inner).poll_read(cx, buf));
        if buf.filled().len() > before {
            self.unanswered.store(true, Ordering::Relaxed);
        }
        Poll::Ready(result)
    }
}

impl<IO: AsyncRead + AsyncWrite + Unpin> AsyncWrite for GuardedIo<IO> {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        std::task::ready!(self.poll_pending(cx))?;
        if !self.refused
            && let Some((status, answer)) = rewrite_refusal(buf)
        {
            self.refused = true;
            self.pending = answer;
            (self.on_refusal)(status);
            // hyper's bytes are taken as written; ours go out now or on the next flush.
            let _ = self.poll_pending(cx)?;
            return Poll::Ready(Ok(buf.len()));
        }
        self.unanswered.store(false, Ordering::Relaxed);
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        std::task::ready!(self.poll_pending(cx))?;
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        std::task::ready!(self.poll_pending(cx))?;
        std::task::ready!(Pin::new(&mut self.inner).poll_flush(cx))?;
        if self.refused {
            // Closing with unread request bytes makes the kernel send a reset, which can destroy the
            // answer before the client reads it: read and drop the rest first, for a bounded time.
            if self.linger.is_none() {
                std::task::ready!(Pin::new(&mut self.inner).poll_shutdown(cx))?;
                self.linger = Some((Box::pin(tokio::time::sleep(LINGER)), 0));
            }
            let mut scratch = [0u8; 8192];
            loop {
                let this = &mut *self;
                let Some((deadline, drained)) = this.linger.as_mut() else { break };
                if deadline.as_mut().poll(cx).is_ready() || *drained > LINGER_BYTES {
                    break;
                }
                let mut buf = ReadBuf::new(&mut scratch);
                match Pin::new(&mut this.inner).poll_read(cx, &mut buf) {
                    Poll::Pending => return Poll::Pending,
                    Poll::Ready(Ok(())) if buf.filled().is_empty() => break,
                    Poll::Ready(Ok(())) => *drained += buf.filled().len(),
                    Poll::Ready(Err(_)) => break,
                }
            }
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// hyper's automatic answer to an unparsable request, as the OperationOutcome response to send instead.
fn rewrite_refusal(buf: &[u8]) -> Option<(u16, Vec<u8>)> {
    let head = std::str::from_utf8(buf).ok()?;
    let rest = head.strip_prefix("HTTP/1.1 ")?;
    let status: u16 = rest.get(..3)?.parse().ok()?;
    let message = match status {
        400 => "the request could not be parsed as HTTP/1.1",
        414 => "the request URL is too long",
        431 => "the request headers are too large",
        _ => return None,
    };
    let lower = head.to_ascii_lowercase();
    if !lower.ends_with("\r\n\r\n") || lower.matches("\r\n\r\n").count() != 1 || !lower.contains("\r\ncontent-length: 0\r\n") {
        return None;
    }
    let code = if status == 400 { IssueCode::Invalid } else { IssueCode::TooLong };
    let body = operation_outcome(&[Issue::error(code, "", message)]).to_string_compact();
    let reason = StatusCode::from_u16(status).ok().and_then(|s| s.canonical_reason()).unwrap_or("Bad Request");
    let answer = format!(
        "HTTP/1.1 {status} {reason}\r\ncontent-type: {}\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
        super::fhir::FHIR_JSON,
        body.len()
    );
    Some((status, answer.into_bytes()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_bare_protocol_refusals_are_rewritten() {
        let (status, answer) = rewrite_refusal(b"HTTP/1.1 431 Request Header Fields Too Large\r\ncontent-length: 0\r\ndate: Thu, 01 Jan 2026 00:00:00 GMT\r\n\r\n").unwrap();
        assert_eq!(status, 431);
        let text = String::from_utf8(answer).unwrap();
        assert!(text.starts_with("HTTP/1.1 431 Request Header Fields Too Large\r\n"), "{text}");
        assert!(text.contains("application/fhir+json") && text.ends_with('}') && text.contains("OperationOutcome"), "{text}");
        assert!(rewrite_refusal(b"HTTP/1.1 414 URI Too Long\r\ncontent-length: 0\r\n\r\n").is_some());
        // The gateway's own answers have bodies; other statuses and partial heads are left alone.
        assert!(rewrite_refusal(b"HTTP/1.1 400 Bad Request\r\ncontent-length: 120\r\n\r\n").is_none());
        assert!(rewrite_refusal(b"HTTP/1.1 404 Not Found\r\ncontent-length: 0\r\n\r\n").is_none());
        assert!(rewrite_refusal(b"HTTP/1.1 400 Bad Request\r\ncontent-length: 0\r\n\r\n{}").is_none());
        assert!(rewrite_refusal(b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n").is_none());
    }

    #[tokio::test]
    async fn a_refusal_is_written_whole_and_reported() {
        use std::sync::atomic::AtomicU16;
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let (client, server) = tokio::io::duplex(64);
        let seen = Arc::new(AtomicU16::new(0));
        let report = seen.clone();
        let mut guarded = GuardedIo::new(server, Box::new(move |s| report.store(s, Ordering::SeqCst)));
        let reader = tokio::spawn(async move {
            let mut client = client;
            let mut all = String::new();
            client.read_to_string(&mut all).await.unwrap();
            all
        });
        guarded.write_all(b"HTTP/1.1 400 Bad Request\r\ncontent-length: 0\r\n\r\n").await.unwrap();
        guarded.shutdown().await.unwrap();
        drop(guarded);
        let all = reader.await.unwrap();
        assert!(all.starts_with("HTTP/1.1 400 Bad Request") && all.contains("OperationOutcome"), "{all}");
        assert_eq!(seen.load(Ordering::SeqCst), 400);
    }
}
