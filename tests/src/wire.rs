//! A sender speaking walship's protocol directly, for tests that drive the receiver message by message.

use std::path::Path;
use std::time::Duration;

use futures::{SinkExt, StreamExt};
use walship_protocol::message::Hello;
use walship_protocol::{Lsn, ReceiverMessage, SenderMessage, TimelineId};
use walship_sender::link::{client_config, connect, Link, Rx, Tx};

/// A session the receiver accepted: its framed halves, the protocol version and the resume points.
pub struct RawSession {
    pub rx: Rx,
    pub tx: Tx,
    pub protocol_version: u16,
    pub resume: Vec<(TimelineId, Lsn)>,
}

/// Connects to the receiver on 127.0.0.1:`port` with the CA and client certificate in `certs`, says
/// `hello` and waits for the answer. `Err` carries what the receiver said instead of `Welcome` (a refusal,
/// e.g. `Busy` while the previous session hands over) or why the connection failed: the caller may retry.
pub async fn open(port: u16, certs: &Path, hello: Hello) -> Result<RawSession, String> {
    let tls = client_config(
        &certs.join("ca.crt"),
        &certs.join("client.crt"),
        &certs.join("client.key"),
    )
    .map_err(|e| e.to_string())?;
    let stream = connect(
        &format!("127.0.0.1:{port}"),
        "localhost",
        tls,
        Duration::from_secs(10),
    )
    .await
    .map_err(|e| e.to_string())?;
    let (mut rx, mut tx) = Link::frame(stream);
    tx.send(SenderMessage::Hello(hello))
        .await
        .map_err(|e| e.to_string())?;
    match rx.next().await {
        Some(Ok(ReceiverMessage::Welcome {
            protocol_version,
            resume,
            ..
        })) => Ok(RawSession {
            rx,
            tx,
            protocol_version,
            resume,
        }),
        other => Err(format!("{other:?}")),
    }
}
