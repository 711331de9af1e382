//! A TCP proxy on loopback whose connections a test can cut, or stall, to simulate network failures.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

/// Forwards 127.0.0.1:`port` to `target`. [`Proxy::cut`] drops every open connection at once;
/// [`Proxy::stall`] keeps them open but stops moving bytes (a hung peer or a black-holed route).
pub struct Proxy {
    pub port: u16,
    generation: Arc<Mutex<CancellationToken>>,
    stop: CancellationToken,
    cuts: Arc<Mutex<u32>>,
    stalled: watch::Sender<bool>,
}

/// Copies `from` to `to`, holding each chunk while the proxy is stalled.
async fn pump<R, W>(mut from: R, mut to: W, mut stalled: watch::Receiver<bool>)
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let mut buf = vec![0u8; 64 << 10];
    loop {
        let n = match from.read(&mut buf).await {
            Ok(0) | Err(_) => {
                // a black-holed route delivers no FIN either: keep the other side open while stalled
                let _ = stalled.wait_for(|s| !*s).await;
                return;
            }
            Ok(n) => n,
        };
        if stalled.wait_for(|s| !*s).await.is_err() {
            return;
        }
        if to.write_all(&buf[..n]).await.is_err() {
            return;
        }
    }
}

impl Proxy {
    pub async fn start(target: SocketAddr) -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind proxy");
        let port = listener.local_addr().expect("proxy addr").port();
        let generation = Arc::new(Mutex::new(CancellationToken::new()));
        let stop = CancellationToken::new();
        let (stalled, stalled_rx) = watch::channel(false);
        let (g, s) = (generation.clone(), stop.clone());
        tokio::spawn(async move {
            loop {
                let (inbound, _) = tokio::select! {
                    _ = s.cancelled() => return,
                    r = listener.accept() => match r { Ok(x) => x, Err(_) => continue },
                };
                let token = g.lock().expect("lock").clone();
                let stalled = stalled_rx.clone();
                tokio::spawn(async move {
                    let Ok(outbound) = TcpStream::connect(target).await else {
                        return;
                    };
                    let _ = outbound.set_nodelay(true);
                    let _ = inbound.set_nodelay(true);
                    let (ir, iw) = inbound.into_split();
                    let (or, ow) = outbound.into_split();
                    tokio::select! {
                        _ = token.cancelled() => {}
                        _ = pump(ir, ow, stalled.clone()) => {}
                        _ = pump(or, iw, stalled) => {}
                    }
                });
            }
        });
        Proxy {
            port,
            generation,
            stop,
            cuts: Arc::new(Mutex::new(0)),
            stalled,
        }
    }

    /// Drops every connection open now (new ones are forwarded again).
    pub fn cut(&self) {
        let mut g = self.generation.lock().expect("lock");
        g.cancel();
        *g = CancellationToken::new();
        *self.cuts.lock().expect("lock") += 1;
    }

    /// Stops (true) or resumes (false) forwarding bytes on every connection, open now or later; connections
    /// stay open meanwhile.
    pub fn stall(&self, stalled: bool) {
        self.stalled.send_replace(stalled);
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.stop.cancel();
        self.generation.lock().map(|g| g.cancel()).ok();
    }
}
