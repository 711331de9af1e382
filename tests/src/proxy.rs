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
    /// Most bytes per second each direction forwards (0: no limit).
    rate: Arc<std::sync::atomic::AtomicU64>,
    /// Connections are refused (closed at once): the server behind is down.
    refusing: Arc<std::sync::atomic::AtomicBool>,
    /// Connections forwarding now.
    open: Arc<std::sync::atomic::AtomicUsize>,
}

/// Counts a connection as open while it lives.
struct OpenGuard(Arc<std::sync::atomic::AtomicUsize>);

impl OpenGuard {
    fn new(open: &Arc<std::sync::atomic::AtomicUsize>) -> OpenGuard {
        open.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        OpenGuard(open.clone())
    }
}

impl Drop for OpenGuard {
    fn drop(&mut self) {
        self.0.fetch_sub(1, std::sync::atomic::Ordering::SeqCst);
    }
}

/// Copies `from` to `to`, holding each chunk while the proxy is stalled, at most `rate` bytes a second.
async fn pump<R, W>(
    mut from: R,
    mut to: W,
    mut stalled: watch::Receiver<bool>,
    rate: Arc<std::sync::atomic::AtomicU64>,
) where
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
        let limit = rate.load(std::sync::atomic::Ordering::Relaxed);
        if limit > 0 {
            tokio::time::sleep(std::time::Duration::from_secs_f64(n as f64 / limit as f64)).await;
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
        let rate = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let refusing = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let open = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let (g, s, r, refuse, o) = (
            generation.clone(),
            stop.clone(),
            rate.clone(),
            refusing.clone(),
            open.clone(),
        );
        tokio::spawn(async move {
            loop {
                let (inbound, _) = tokio::select! {
                    _ = s.cancelled() => return,
                    r = listener.accept() => match r { Ok(x) => x, Err(_) => continue },
                };
                if refuse.load(std::sync::atomic::Ordering::Relaxed) {
                    drop(inbound);
                    continue;
                }
                // counted under the same lock as the generation: a cut either sees it or it sees the cut
                let (token, guard) = {
                    let g = g.lock().expect("lock");
                    (g.clone(), OpenGuard::new(&o))
                };
                let stalled = stalled_rx.clone();
                let rate = r.clone();
                tokio::spawn(async move {
                    let _guard = guard;
                    let Ok(outbound) = TcpStream::connect(target).await else {
                        return;
                    };
                    let _ = outbound.set_nodelay(true);
                    let _ = inbound.set_nodelay(true);
                    let (ir, iw) = inbound.into_split();
                    let (or, ow) = outbound.into_split();
                    tokio::select! {
                        _ = token.cancelled() => {}
                        _ = pump(ir, ow, stalled.clone(), rate.clone()) => {}
                        _ = pump(or, iw, stalled, rate) => {}
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
            rate,
            refusing,
            open,
        }
    }

    /// The server behind goes down (true: open connections are cut, new ones closed at once) or comes back.
    pub fn refuse(&self, refusing: bool) {
        self.refusing
            .store(refusing, std::sync::atomic::Ordering::Relaxed);
        if refusing {
            self.cut();
        }
    }

    /// Drops every connection open now (new ones are forwarded again); returns how many that was, so that a
    /// test can tell a cut that cut something from one that came before the connection it meant.
    pub fn cut(&self) -> usize {
        let mut g = self.generation.lock().expect("lock");
        let open = self.open.load(std::sync::atomic::Ordering::SeqCst);
        g.cancel();
        *g = CancellationToken::new();
        *self.cuts.lock().expect("lock") += 1;
        open
    }

    /// Forwards at most `bytes_per_second` each way (0: no limit), on every connection: a slow link.
    pub fn throttle(&self, bytes_per_second: u64) {
        self.rate
            .store(bytes_per_second, std::sync::atomic::Ordering::Relaxed);
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
