//! One connection up to its session: TLS, `--allow-sender`, the `Hello` validated against the archive
//! (identity, newest timeline, fence), the live-session rule (a second sender is refused while the first
//! streams; a silent one hands over), then `Welcome` and the stream.

use super::*;

pub(crate) async fn say<S: AsyncWrite>(writer: &mut Writer<S>, msg: ReceiverMessage) {
    // best effort: the peer may be gone already
    let _ = tokio::time::timeout(Duration::from_secs(2), writer.send(msg)).await;
}

/// Sends `msg` within `deadline`.
pub(crate) async fn send<S: AsyncWrite>(
    writer: &mut Writer<S>,
    msg: ReceiverMessage,
    deadline: Duration,
    what: &str,
) -> Result<()> {
    match tokio::time::timeout(deadline, writer.send(msg)).await {
        Ok(r) => r.with_context(|| format!("send {what}")),
        Err(_) => {
            bail!("sending {what} did not complete within {deadline:?}: the sender stopped reading")
        }
    }
}

pub(crate) async fn refuse<S: AsyncWrite>(
    writer: &mut Writer<S>,
    code: RefuseCode,
    reason: String,
) -> anyhow::Error {
    say(
        writer,
        ReceiverMessage::Refuse {
            code,
            reason: reason.clone(),
        },
    )
    .await;
    anyhow!("refused sender: {reason}")
}

pub(crate) fn refuse_code(m: &IdentityMismatch) -> RefuseCode {
    match m {
        IdentityMismatch::ForeignCluster { .. } => RefuseCode::ForeignCluster,
        IdentityMismatch::SegmentSize { .. } => RefuseCode::SegmentSizeMismatch,
        IdentityMismatch::MajorVersion { .. } => RefuseCode::Other,
    }
}

pub(crate) fn superseded(latest: TimelineId, hello: &Hello) -> String {
    format!(
        "the archive already holds timeline {latest}, newer than this primary's timeline {}: this server was superseded by a failover and must not ship WAL into this archive",
        hello.timeline
    )
}

pub(crate) async fn session(
    shared: &Arc<Shared>,
    tcp: tokio::net::TcpStream,
    token: CancellationToken,
) -> Result<(), SessionError> {
    let opts = &shared.opts;
    let mut tls = authenticate(shared, tcp, &token).await?;
    let Ok(_permit) = shared.sessions.clone().try_acquire_owned() else {
        return Err(SessionError::Closed(anyhow!(
            "too many authenticated connections ({}); closing this one",
            opts.max_sessions
        )));
    };
    // an authenticated sender of this archive: now the large buffer that its stream of WAL reads through
    tls.get_mut().0.enlarge(SOCKET_BUFFER);
    let (rd, wr) = tokio::io::split(tls);
    let mut reader: Reader<_> = FramedRead::new(rd, MessageCodec::new(opts.max_payload));
    let mut writer: Writer<_> = FramedWrite::new(wr, MessageCodec::new(opts.max_payload));

    let hello = read_hello(&mut reader, &mut writer, opts.handshake_timeout).await?;
    let span = tracing::info_span!("sender", name = %hello.sender_name, timeline = hello.timeline);
    async move {
        let (features, offered) = offer(&hello, &mut writer).await?;
        // Validate before disturbing anyone: a sender that must not write here is refused while the live
        // session goes on.
        let known = shared.known();
        if let Some(Err(mismatch)) = known.identity.map(|id| id.admits(&offered)) {
            return Err(refuse_mismatch(&mut writer, &mismatch).await);
        }
        if let Some(latest) = known.latest_timeline.filter(|t| *t > hello.timeline) {
            let reason = superseded(latest, &hello);
            return Err(refuse(&mut writer, RefuseCode::TimelineBehind, reason)
                .await
                .into());
        }
        let guard = take_archive(shared, &mut writer, &token).await?;
        shared
            .active
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .replace(token.clone());
        shared.heard_now();
        let mut guard = admit(shared, guard, offered, &hello, &mut writer).await?;
        let resume = guard.begin_session();
        info!(
            ?resume,
            version = features.version(),
            pg_version_num = hello.pg_version_num,
            "sender accepted"
        );
        crate::metrics::METRICS.sessions.inc();
        let compression = if features.wire_compression() && opts.wire_compression {
            Compression::Zstd
        } else {
            Compression::None
        };
        let welcome = ReceiverMessage::Welcome {
            protocol_version: features.version(),
            resume: resume.clone(),
            compression,
        };
        send(&mut writer, welcome, opts.send_timeout, "Welcome").await?;
        let start = resume.iter().find(|(t, _)| *t == hello.timeline).copied();
        let opened = Opened {
            hello: &hello,
            features,
            start,
        };
        stream(shared, opened, guard, reader, writer, token).await
    }
    .instrument(span)
    .await
}

/// What the `Hello` offers, if this receiver can take it at all: a common protocol version (its
/// features), a valid segment size, a supported PostgreSQL version.
async fn offer<S: AsyncWrite>(
    hello: &Hello,
    writer: &mut Writer<S>,
) -> Result<(Features, Identity), SessionError> {
    let Some(features) = Features::negotiate(hello.version_min, hello.version_max) else {
        let reason = format!(
            "no common protocol version: sender speaks {}..={}, this receiver {}..={}",
            hello.version_min, hello.version_max, PROTOCOL_VERSION_MIN, PROTOCOL_VERSION_MAX
        );
        return Err(refuse(writer, RefuseCode::UnsupportedVersion, reason)
            .await
            .into());
    };
    let seg = match WalSegSize::new(hello.wal_segment_size as u64) {
        Ok(seg) => seg,
        Err(e) => {
            return Err(refuse(writer, RefuseCode::Other, e.to_string())
                .await
                .into())
        }
    };
    if walship_protocol::wal::page_magic_for_version(hello.pg_version_num).is_none() {
        let reason = format!(
            "PostgreSQL server_version_num {} is not supported (9.6 to 18 are)",
            hello.pg_version_num
        );
        return Err(refuse(writer, RefuseCode::Other, reason).await.into());
    }
    let offered = Identity {
        system_identifier: hello.system_identifier,
        wal_segment_size: seg,
        pg_version_num: hello.pg_version_num,
    };
    Ok((features, offered))
}

/// The authoritative checks, under the archive's lock: the identity (pinned on first contact), the newest
/// timeline, the fence of a failed-over timeline. An admitted sender also ends the primary-down state (the
/// primary, or its successor, is up again).
async fn admit<S: AsyncWrite>(
    shared: &Arc<Shared>,
    guard: OwnedMutexGuard<Archive>,
    offered: Identity,
    hello: &Hello,
    writer: &mut Writer<S>,
) -> Result<OwnedMutexGuard<Archive>, SessionError> {
    let (guard, checked) = tokio::task::spawn_blocking(move || {
        let mut guard = guard;
        let r = guard.check_or_pin_identity(offered);
        (guard, r)
    })
    .await
    .context("identity check task")?;
    shared.learn(&guard, None);
    if let Err(mismatch) = checked.context("pin archive identity")? {
        return Err(refuse_mismatch(writer, &mismatch).await);
    }
    if let Some(latest) = guard.latest_timeline().filter(|t| *t > hello.timeline) {
        let reason = superseded(latest, hello);
        return Err(refuse(writer, RefuseCode::TimelineBehind, reason)
            .await
            .into());
    }
    // after a failover the old primary's timeline is fenced (its end went to recovery)
    if let Some(handover) = guard
        .fenced(hello.timeline)
        .context("read the failover state")?
    {
        let reason = crate::archive::fence_message(&handover);
        warn!("refused a sender of a fenced timeline: {reason}");
        return Err(refuse(writer, RefuseCode::TimelineBehind, reason)
            .await
            .into());
    }
    shared.learn(&guard, Some(hello.timeline));
    let guard = tokio::task::spawn_blocking(move || {
        let mut guard = guard;
        if let Err(e) = guard.clear_primary_down() {
            warn!("{e:#}");
        }
        guard
    })
    .await
    .context("clear the primary's down state")?;
    Ok(guard)
}

/// Refuses a sender of another cluster (or segment size, or major version).
async fn refuse_mismatch<S: AsyncWrite>(
    writer: &mut Writer<S>,
    mismatch: &IdentityMismatch,
) -> SessionError {
    warn!("refused a sender: {mismatch}");
    refuse(writer, refuse_code(mismatch), mismatch.for_peer())
        .await
        .into()
}

/// The TLS handshake of a new connection, within `--tls-timeout` and while newer connections do not evict
/// it, and `--allow-sender`: an authenticated peer the archive may hear from.
async fn authenticate(
    shared: &Arc<Shared>,
    tcp: tokio::net::TcpStream,
    token: &CancellationToken,
) -> Result<
    tokio_rustls::server::TlsStream<crate::socket::SocketBuf<tokio::net::TcpStream>>,
    SessionError,
> {
    let opts = &shared.opts;
    // a small read buffer until the peer has authenticated (see crate::socket)
    let tcp = crate::socket::SocketBuf::new(tcp);
    let (id, evict) = shared.admit();
    let accepted = tokio::select! {
        _ = evict.cancelled() => Err(anyhow!("evicted before completing the TLS handshake: newer connections needed the place")),
        _ = token.cancelled() => Err(anyhow!("the receiver is shutting down")),
        r = tokio::time::timeout(opts.tls_timeout, TlsAcceptor::from(shared.tls.current()).accept(tcp)) => match r {
            Err(_) => Err(anyhow!("no TLS handshake within {:?}", opts.tls_timeout)),
            Ok(Err(e)) => Err(anyhow::Error::new(e).context(
                "TLS handshake failed (client without a certificate signed by --tls-client-ca?)",
            )),
            Ok(Ok(tls)) => Ok(tls),
        },
    };
    shared.authenticated(id);
    let tls = accepted.map_err(SessionError::Unauthenticated)?;
    if !opts.allowed_senders.is_empty() {
        // a certificate of the CA that is not named: closed without a word about the archive
        let names = tls
            .get_ref()
            .1
            .peer_certificates()
            .and_then(|c| c.first())
            .map(|c| certificate_names(c.as_ref()))
            .unwrap_or_default();
        if !names.iter().any(|n| opts.allowed_senders.contains(n)) {
            return Err(SessionError::Closed(anyhow!(
                "client certificate {names:?} is not among --allow-sender {:?}; closing the connection",
                opts.allowed_senders
            )));
        }
    }
    Ok(tls)
}

/// The sender's first message, which must be a `Hello`, within `timeout`.
async fn read_hello<S: AsyncRead + AsyncWrite>(
    reader: &mut Reader<S>,
    writer: &mut Writer<S>,
    timeout: Duration,
) -> Result<Hello, SessionError> {
    match tokio::time::timeout(timeout, reader.next()).await {
        Err(_) => Err(anyhow!("no Hello within {timeout:?}").into()),
        Ok(None) => Err(anyhow!("connection closed before Hello").into()),
        Ok(Some(Err(e))) => {
            say(
                writer,
                ReceiverMessage::Error {
                    reason: e.to_string(),
                },
            )
            .await;
            Err(anyhow::Error::new(e)
                .context("malformed frame instead of Hello")
                .into())
        }
        Ok(Some(Ok(SenderMessage::Hello(h)))) => Ok(h),
        Ok(Some(Ok(_))) => {
            let reason = "protocol violation: the first message must be Hello".to_string();
            say(
                writer,
                ReceiverMessage::Error {
                    reason: reason.clone(),
                },
            )
            .await;
            Err(anyhow!(reason).into())
        }
    }
}

/// The archive for a new session. A live session keeps it: two primaries of one cluster (a restored copy
/// started as a primary, a split brain) must not take turns writing it, so a second sender is refused while
/// the first streams; a session whose sender is gone or silent hands it over.
async fn take_archive<S: AsyncWrite>(
    shared: &Arc<Shared>,
    writer: &mut Writer<S>,
    token: &CancellationToken,
) -> Result<OwnedMutexGuard<Archive>, SessionError> {
    let opts = &shared.opts;
    let guard = match shared.archive.clone().try_lock_owned() {
        Ok(guard) => guard,
        Err(_) => {
            let waited = tokio::select! {
                _ = token.cancelled() => return Err(anyhow!("the receiver is shutting down").into()),
                g = tokio::time::timeout(RECONNECT_GRACE, shared.archive.clone().lock_owned()) => g.ok(),
            };
            match waited {
                Some(guard) => guard,
                None => {
                    let silent = shared.silent_for();
                    if silent < LIVE_SENDER {
                        let reason = format!(
                            "another sender is streaming into this archive (its last message came {} ms ago): an archive takes WAL from one primary at a time. \
                             The same server reconnecting gets in once its old connection has been silent for {LIVE_SENDER:?}; \
                             another server with this cluster's system identifier (a restored copy started as a primary, a split brain) must not ship here: stop its sender",
                            silent.as_millis()
                        );
                        warn!("refused a second sender: {reason}");
                        return Err(refuse(writer, RefuseCode::Busy, reason).await.into());
                    }
                    info!(
                        silent_ms = silent.as_millis() as u64,
                        "a silent session holds the archive; asking it to hand over"
                    );
                    let previous = shared
                        .active
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .take();
                    if let Some(previous) = previous {
                        previous.cancel();
                    }
                    tokio::select! {
                        _ = token.cancelled() => return Err(anyhow!("the receiver is shutting down").into()),
                        g = tokio::time::timeout(opts.takeover_timeout, shared.archive.clone().lock_owned()) => match g {
                            Ok(guard) => guard,
                            Err(_) => {
                                let reason = format!("the archive is busy: the previous session did not hand it over within {:?}", opts.takeover_timeout);
                                return Err(refuse(writer, RefuseCode::Busy, reason).await.into());
                            }
                        },
                    }
                }
            }
        }
    };
    Ok(guard)
}
