//! The socket under a session's TLS layer: a read buffer that starts small and is enlarged once the peer has
//! authenticated.
//!
//! TLS reads the socket in small pieces; a large buffer under it turns a sender's stream of WAL into few
//! reads. But every connection that arrives would pay for it before anything is known about the peer, so a
//! flood of connections that never finish their handshake would cost memory for nothing (issue 19,
//! point 9). [`SocketBuf`] reads through a small buffer until [`SocketBuf::enlarge`] is called after the
//! handshake; writes go straight to the socket.

use std::io;
use std::pin::Pin;
use std::task::{ready, Context, Poll};

use tokio::io::{AsyncBufRead, AsyncRead, AsyncWrite, ReadBuf};

/// The read buffer of a connection before its TLS handshake is complete (a TLS record header and more).
pub const HANDSHAKE_BUFFER: usize = 4 << 10;

/// A buffered reader over `S` whose buffer can grow; writes pass through.
#[derive(Debug)]
pub struct SocketBuf<S> {
    inner: S,
    buf: Box<[u8]>,
    pos: usize,
    filled: usize,
}

impl<S> SocketBuf<S> {
    /// A reader with a buffer of [`HANDSHAKE_BUFFER`] bytes.
    pub fn new(inner: S) -> SocketBuf<S> {
        SocketBuf {
            inner,
            buf: vec![0; HANDSHAKE_BUFFER].into_boxed_slice(),
            pos: 0,
            filled: 0,
        }
    }

    /// Grows the buffer to `capacity` bytes (never shrinks it), keeping what it holds.
    pub fn enlarge(&mut self, capacity: usize) {
        if capacity <= self.buf.len() {
            return;
        }
        let mut bigger = vec![0; capacity].into_boxed_slice();
        let held = self.filled - self.pos;
        bigger[..held].copy_from_slice(&self.buf[self.pos..self.filled]);
        self.buf = bigger;
        self.pos = 0;
        self.filled = held;
    }

    /// The buffer's size.
    pub fn capacity(&self) -> usize {
        self.buf.len()
    }

    pub fn get_ref(&self) -> &S {
        &self.inner
    }
}

impl<S: AsyncRead + Unpin> AsyncBufRead for SocketBuf<S> {
    fn poll_fill_buf(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<&[u8]>> {
        let this = self.get_mut();
        if this.pos >= this.filled {
            let mut rb = ReadBuf::new(&mut this.buf);
            ready!(Pin::new(&mut this.inner).poll_read(cx, &mut rb))?;
            this.filled = rb.filled().len();
            this.pos = 0;
        }
        Poll::Ready(Ok(&this.buf[this.pos..this.filled]))
    }

    fn consume(self: Pin<&mut Self>, amt: usize) {
        let this = self.get_mut();
        this.pos = (this.pos + amt).min(this.filled);
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for SocketBuf<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        out: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        // a read at least as large as the buffer bypasses it
        if self.pos >= self.filled && out.remaining() >= self.buf.len() {
            return Pin::new(&mut self.inner).poll_read(cx, out);
        }
        let held = ready!(self.as_mut().poll_fill_buf(cx))?;
        let n = held.len().min(out.remaining());
        out.put_slice(&held[..n]);
        self.consume(n);
        Poll::Ready(Ok(()))
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for SocketBuf<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, data)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// Bytes read through a small buffer, then through an enlarged one, arrive whole and in order.
    #[tokio::test]
    async fn reads_every_byte_in_order_across_an_enlargement() {
        let data: Vec<u8> = (0..200_000u32).map(|i| (i % 251) as u8).collect();
        let (mut tx, rx) = tokio::io::duplex(8192);
        let sent = data.clone();
        let writer = tokio::spawn(async move {
            tx.write_all(&sent).await.unwrap();
        });
        let mut r = SocketBuf::new(rx);
        assert_eq!(r.capacity(), HANDSHAKE_BUFFER);
        let mut got = vec![0u8; 10_000];
        r.read_exact(&mut got[..100]).await.unwrap();
        r.enlarge(256 << 10);
        assert_eq!(r.capacity(), 256 << 10);
        r.read_exact(&mut got[100..]).await.unwrap();
        let mut rest = Vec::new();
        r.read_to_end(&mut rest).await.unwrap();
        got.extend_from_slice(&rest);
        writer.await.unwrap();
        assert_eq!(got, data);
    }
}
