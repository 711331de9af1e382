//! A TCP proxy on loopback whose connections a test can cut, to simulate a network failure.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;

/// Forwards 127.0.0.1:`port` to `target`. [`Proxy::cut`] drops every open connection at once.
pub struct Proxy {
    pub port: u16,
    generation: Arc<Mutex<CancellationToken>>,
    stop: CancellationToken,
    cuts: Arc<Mutex<u32>>,
}

impl Proxy {
    pub async fn start(target: SocketAddr) -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind proxy");
        let port = listener.local_addr().expect("proxy addr").port();
        let generation = Arc::new(Mutex::new(CancellationToken::new()));
        let stop = CancellationToken::new();
        let (g, s) = (generation.clone(), stop.clone());
        tokio::spawn(async move {
            loop {
                let (inbound, _) = tokio::select! {
                    _ = s.cancelled() => return,
                    r = listener.accept() => match r { Ok(x) => x, Err(_) => continue },
                };
                let token = g.lock().expect("lock").clone();
                tokio::spawn(async move {
                    let Ok(mut outbound) = TcpStream::connect(target).await else {
                        return;
                    };
                    let mut inbound = inbound;
                    tokio::select! {
                        _ = token.cancelled() => {}
                        _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound) => {}
                    }
                });
            }
        });
        Proxy {
            port,
            generation,
            stop,
            cuts: Arc::new(Mutex::new(0)),
        }
    }

    /// Drops every connection open now (new ones are forwarded again).
    pub fn cut(&self) {
        let mut g = self.generation.lock().expect("lock");
        g.cancel();
        *g = CancellationToken::new();
        *self.cuts.lock().expect("lock") += 1;
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.stop.cancel();
        self.generation.lock().map(|g| g.cancel()).ok();
    }
}
