//! The replication connection on the wire: the socket (TCP or Unix, TLS by `sslmode`), the startup packet with
//! `replication=true`, authentication (cleartext, MD5, SCRAM-SHA-256 from `postgres-protocol`), the simple
//! queries of the replication grammar, and the backend's messages.
//!
//! tokio-postgres 0.7 cannot open a replication connection (no `replication` startup parameter, no
//! CopyBoth), so this file speaks the protocol itself; every message it builds comes from
//! `postgres_protocol::message::frontend`, and only the few backend messages a walsender sends are parsed
//! here.

use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};
use bytes::{Buf, Bytes, BytesMut};
use postgres_protocol::authentication::sasl::{ChannelBinding, ScramSha256};
use postgres_protocol::message::frontend;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio_postgres::config::Host;

use crate::conninfo::{Conn, SslMode};

/// A byte stream to the server: TCP, a Unix socket, or TLS over TCP.
pub(crate) trait Io: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Io for T {}

/// An error the server sent (`ErrorResponse`), with its SQLSTATE.
#[derive(Debug, Clone)]
pub struct ServerError {
    pub code: String,
    pub message: String,
    pub detail: Option<String>,
    pub hint: Option<String>,
}

impl std::fmt::Display for ServerError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} (SQLSTATE {})", self.message, self.code)?;
        if let Some(d) = &self.detail {
            write!(f, "; {d}")?;
        }
        if let Some(h) = &self.hint {
            write!(f, "; hint: {h}")?;
        }
        Ok(())
    }
}

impl std::error::Error for ServerError {}

impl ServerError {
    /// The fields of an `ErrorResponse` body: (type byte, C string)*, then a zero byte.
    pub(crate) fn parse(mut body: &[u8]) -> ServerError {
        let mut e = ServerError {
            code: String::new(),
            message: String::new(),
            detail: None,
            hint: None,
        };
        while let Some((&kind, rest)) = body.split_first() {
            if kind == 0 {
                break;
            }
            let end = rest.iter().position(|b| *b == 0).unwrap_or(rest.len());
            let value = String::from_utf8_lossy(&rest[..end]).into_owned();
            match kind {
                b'C' => e.code = value,
                b'M' => e.message = value,
                b'D' => e.detail = Some(value),
                b'H' => e.hint = Some(value),
                _ => {}
            }
            body = rest.get(end + 1..).unwrap_or(&[]);
        }
        e
    }
}

/// Reads one backend message: its tag and body.
pub(crate) async fn read_message<R: AsyncRead + Unpin>(r: &mut R) -> std::io::Result<(u8, Bytes)> {
    let mut head = [0u8; 5];
    r.read_exact(&mut head).await?;
    let len = u32::from_be_bytes([head[1], head[2], head[3], head[4]]) as usize;
    if !(4..=(1 << 30)).contains(&len) {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("a message of the replication connection claims {len} bytes"),
        ));
    }
    let mut body = BytesMut::zeroed(len - 4);
    r.read_exact(&mut body).await?;
    Ok((head[0], body.freeze()))
}

/// Connects as `conn` says (the first host that answers) and authenticates a physical replication session
/// named `application_name`; returns the stream once the server is ready for commands.
pub(crate) async fn connect(conn: &Conn, application_name: &str) -> Result<Box<dyn Io>> {
    let config = &conn.config;
    let ports = config.get_ports();
    let timeout = config
        .get_connect_timeout()
        .copied()
        .unwrap_or(Duration::from_secs(10));
    let mut last = None;
    for (i, host) in config.get_hosts().iter().enumerate() {
        let port = ports
            .get(i)
            .or_else(|| ports.first())
            .copied()
            .unwrap_or(5432);
        let attempt = tokio::time::timeout(timeout, open(conn, host, port, i)).await;
        match attempt {
            Ok(Ok(io)) => return startup(io, conn, application_name).await,
            Ok(Err(e)) => last = Some(e),
            Err(_) => last = Some(anyhow!("connecting timed out after {timeout:?}")),
        }
    }
    Err(last.unwrap_or_else(|| anyhow!("the connection string names no host")))
}

/// The socket to one host, with TLS when `sslmode` asks for it (never over a Unix socket, as libpq).
async fn open(conn: &Conn, host: &Host, port: u16, index: usize) -> Result<Box<dyn Io>> {
    let name = match host {
        Host::Unix(dir) => {
            let path = dir.join(format!(".s.PGSQL.{port}"));
            let socket = tokio::net::UnixStream::connect(&path)
                .await
                .with_context(|| format!("connect to {}", path.display()))?;
            return Ok(Box::new(socket));
        }
        Host::Tcp(name) => name.clone(),
    };
    let addr = config_hostaddr(conn, index);
    let tcp = match addr {
        Some(ip) => tokio::net::TcpStream::connect((ip, port)).await,
        None => tokio::net::TcpStream::connect((name.as_str(), port)).await,
    }
    .with_context(|| format!("connect to {name}:{port}"))?;
    tcp.set_nodelay(true).ok();
    let Some(tls) = conn
        .tls
        .clone()
        .filter(|_| conn.sslmode != SslMode::Disable)
    else {
        return Ok(Box::new(tcp));
    };
    let mut tcp = tcp;
    let mut buf = BytesMut::new();
    frontend::ssl_request(&mut buf);
    tcp.write_all(&buf).await.context("send SSLRequest")?;
    let mut answer = [0u8; 1];
    tcp.read_exact(&mut answer)
        .await
        .context("read the answer to SSLRequest")?;
    if answer[0] != b'S' {
        if matches!(
            conn.sslmode,
            SslMode::Require | SslMode::VerifyCa | SslMode::VerifyFull
        ) {
            bail!("server does not support TLS, but sslmode requires it");
        }
        return Ok(Box::new(tcp));
    }
    let server_name = rustls_pki_types::ServerName::try_from(name.clone())
        .with_context(|| format!("{name:?} is not a valid TLS server name"))?;
    let stream = tokio_rustls::TlsConnector::from(tls)
        .connect(server_name, tcp)
        .await
        .context("TLS handshake with the primary")?;
    Ok(Box::new(stream))
}

fn config_hostaddr(conn: &Conn, index: usize) -> Option<std::net::IpAddr> {
    conn.config.get_hostaddrs().get(index).copied()
}

/// The startup packet and authentication, until `ReadyForQuery`.
async fn startup(mut io: Box<dyn Io>, conn: &Conn, application_name: &str) -> Result<Box<dyn Io>> {
    let user = conn
        .config
        .get_user()
        .context("the connection string names no user")?
        .to_owned();
    let mut buf = BytesMut::new();
    let params = [
        ("user", user.as_str()),
        ("replication", "true"),
        ("application_name", application_name),
    ];
    frontend::startup_message(params.iter().copied(), &mut buf)?;
    io.write_all(&buf)
        .await
        .context("send the startup packet")?;
    let password = || {
        conn.config.get_password().ok_or_else(|| {
            anyhow!("the primary asks for a password and none is set (password in --pgconn, PGPASSWORD or the password file)")
        })
    };
    let mut scram: Option<ScramSha256> = None;
    loop {
        let (tag, body) = read_message(&mut io)
            .await
            .context("read the server's answer to the startup packet")?;
        let mut out = BytesMut::new();
        match tag {
            b'R' => {
                let mut b = body.clone();
                if b.len() < 4 {
                    bail!("malformed authentication request");
                }
                match b.get_i32() {
                    0 => {}
                    3 => frontend::password_message(password()?, &mut out)?,
                    5 => {
                        let salt: [u8; 4] = b
                            .get(..4)
                            .and_then(|s| s.try_into().ok())
                            .context("malformed MD5 request")?;
                        let hash = postgres_protocol::authentication::md5_hash(
                            user.as_bytes(),
                            password()?,
                            salt,
                        );
                        frontend::password_message(hash.as_bytes(), &mut out)?;
                    }
                    10 => {
                        let offered = String::from_utf8_lossy(&b);
                        if !offered.split('\0').any(|m| m == "SCRAM-SHA-256") {
                            bail!("the primary offers only SASL mechanisms walship does not speak: {offered:?}");
                        }
                        let s = ScramSha256::new(password()?, ChannelBinding::unsupported());
                        frontend::sasl_initial_response("SCRAM-SHA-256", s.message(), &mut out)?;
                        scram = Some(s);
                    }
                    11 => {
                        let s = scram.as_mut().context("SASL continue without a SASL start")?;
                        s.update(&b).context("SCRAM authentication")?;
                        frontend::sasl_response(s.message(), &mut out)?;
                    }
                    12 => scram
                        .as_mut()
                        .context("SASL final without a SASL start")?
                        .finish(&b)
                        .context("SCRAM authentication: the server's proof is wrong")?,
                    other => bail!("the primary asks for authentication method {other}, which walship does not speak (use scram-sha-256, md5, password or trust in pg_hba.conf)"),
                }
            }
            b'E' => return Err(ServerError::parse(&body).into()),
            b'Z' => return Ok(io),
            _ => {} // ParameterStatus, BackendKeyData, NoticeResponse
        }
        if !out.is_empty() {
            io.write_all(&out).await.context("send authentication")?;
        }
    }
}

/// Runs one command of the replication grammar and returns its rows (text columns; `None` for NULL).
pub(crate) async fn simple_query(
    io: &mut Box<dyn Io>,
    sql: &str,
) -> Result<Vec<Vec<Option<String>>>> {
    let mut buf = BytesMut::new();
    frontend::query(sql, &mut buf)?;
    io.write_all(&buf)
        .await
        .with_context(|| format!("send {sql}"))?;
    let mut rows = Vec::new();
    let mut error = None;
    loop {
        let (tag, body) = read_message(io)
            .await
            .with_context(|| format!("read the answer to {sql}"))?;
        match tag {
            b'D' => rows.push(data_row(body).with_context(|| format!("a row of {sql}"))?),
            b'E' => error = Some(ServerError::parse(&body)),
            b'Z' => break,
            _ => {} // RowDescription, CommandComplete, NoticeResponse
        }
    }
    match error {
        Some(e) => Err(anyhow::Error::new(e).context(format!("{sql} failed"))),
        None => Ok(rows),
    }
}

fn data_row(mut body: Bytes) -> Result<Vec<Option<String>>> {
    if body.len() < 2 {
        bail!("malformed DataRow");
    }
    let n = body.get_i16();
    let mut row = Vec::with_capacity(n.max(0) as usize);
    for _ in 0..n {
        if body.len() < 4 {
            bail!("malformed DataRow");
        }
        let len = body.get_i32();
        if len < 0 {
            row.push(None);
            continue;
        }
        let len = len as usize;
        if body.len() < len {
            bail!("malformed DataRow");
        }
        row.push(Some(
            String::from_utf8_lossy(&body.split_to(len)).into_owned(),
        ));
    }
    Ok(row)
}

/// Sends `START_REPLICATION` and waits for the server to enter CopyBoth mode.
pub(crate) async fn start_replication(io: &mut Box<dyn Io>, command: &str) -> Result<()> {
    let mut buf = BytesMut::new();
    frontend::query(command, &mut buf)?;
    io.write_all(&buf)
        .await
        .with_context(|| format!("send {command}"))?;
    loop {
        let (tag, body) = read_message(io)
            .await
            .with_context(|| format!("read the answer to {command}"))?;
        match tag {
            b'W' => return Ok(()),
            b'E' => {
                return Err(anyhow::Error::new(ServerError::parse(&body))
                    .context(format!("{command} failed")))
            }
            b'Z' => bail!("{command}: the server returned to idle without streaming"),
            _ => {}
        }
    }
}

/// A standby status update (`r`) in a CopyData message: `write` and `flush` are what walship's archive holds
/// durably; nothing is applied (as pg_receivewal reports).
pub(crate) fn status_update(durable: u64, now_pg_micros: i64, reply: bool, out: &mut BytesMut) {
    use bytes::BufMut;
    let mut body = BytesMut::with_capacity(34);
    body.put_u8(b'r');
    body.put_u64(durable);
    body.put_u64(durable);
    body.put_u64(0);
    body.put_i64(now_pg_micros);
    body.put_u8(reply as u8);
    // a CopyData message: 'd', length, payload
    out.put_u8(b'd');
    out.put_i32(4 + body.len() as i32);
    out.extend_from_slice(&body);
}

/// Microseconds since 2000-01-01 UTC, PostgreSQL's clock.
pub(crate) fn pg_now() -> i64 {
    const PG_EPOCH_UNIX_SECS: u64 = 946_684_800;
    let unix = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_micros() as i64)
        .unwrap_or(0);
    unix - (PG_EPOCH_UNIX_SECS as i64) * 1_000_000
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn error_fields() {
        let body =
            b"SFATAL\0C28000\0Mno pg_hba.conf entry for replication connection\0Hadd one\0\0";
        let e = ServerError::parse(body);
        assert_eq!(e.code, "28000");
        assert_eq!(e.message, "no pg_hba.conf entry for replication connection");
        assert_eq!(e.hint.as_deref(), Some("add one"));
        assert!(e.to_string().contains("SQLSTATE 28000"));
    }

    #[test]
    fn status_update_layout() {
        let mut out = BytesMut::new();
        status_update(0x1_0000_0028, 7, true, &mut out);
        assert_eq!(out[0], b'd');
        assert_eq!(i32::from_be_bytes(out[1..5].try_into().unwrap()), 4 + 34);
        assert_eq!(out[5], b'r');
        assert_eq!(&out[6..14], &0x1_0000_0028u64.to_be_bytes());
        assert_eq!(&out[14..22], &0x1_0000_0028u64.to_be_bytes());
        assert_eq!(&out[22..30], &0u64.to_be_bytes());
        assert_eq!(out[38], 1);
    }

    #[test]
    fn rows() {
        let mut b = BytesMut::new();
        b.extend_from_slice(&2i16.to_be_bytes());
        b.extend_from_slice(&3i32.to_be_bytes());
        b.extend_from_slice(b"abc");
        b.extend_from_slice(&(-1i32).to_be_bytes());
        assert_eq!(
            data_row(b.freeze()).unwrap(),
            vec![Some("abc".to_owned()), None]
        );
    }
}
