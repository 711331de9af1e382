//! What the sender is doing, published by [`crate::run`] through a `tokio::sync::watch` channel: sessions
//! started, reconnections and the last error, the timeline and what the receiver acknowledged. `check`
//! waits on it (no polling of global counters); the Prometheus metrics are kept beside it.

use std::sync::Arc;

use tokio::sync::watch;
use walship_protocol::{Lsn, TimelineId};

/// A snapshot of the sender.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SenderState {
    /// Sessions that reached streaming.
    pub sessions: u64,
    /// Sessions that ended on an error and were made anew.
    pub reconnects: u64,
    /// The error that ended the last session.
    pub last_error: Option<String>,
    /// What of it concerns the receiver (for the fix `check` prints).
    pub last_trouble: Option<crate::error::ReceiverTrouble>,
    /// The timeline being shipped (once a session streams).
    pub timeline: Option<TimelineId>,
    /// End of the WAL the receiver acknowledged as durable.
    pub durable: Lsn,
    /// End of the durable WAL the primary has flushed too.
    pub confirmed: Lsn,
}

/// The publishing side, shared by the session's parts.
#[derive(Clone, Debug)]
pub struct StatePublisher(Arc<watch::Sender<SenderState>>);

impl StatePublisher {
    /// A publisher and the first receiver of its snapshots.
    pub fn new() -> (StatePublisher, watch::Receiver<SenderState>) {
        let (tx, rx) = watch::channel(SenderState::default());
        (StatePublisher(Arc::new(tx)), rx)
    }

    /// Changes the state; receivers are woken only when something changed.
    pub fn update(&self, f: impl FnOnce(&mut SenderState)) {
        self.0.send_if_modified(|s| {
            let before = s.clone();
            f(s);
            *s != before
        });
    }

    /// A session reached streaming on `timeline`, the receiver holding `start`.
    pub fn streaming(&self, timeline: TimelineId, start: Lsn) {
        self.update(|s| {
            s.sessions += 1;
            s.timeline = Some(timeline);
            s.durable = start;
            s.confirmed = start;
        });
    }

    /// A session ended on `error`; another is made.
    pub fn reconnecting(&self, error: &anyhow::Error) {
        let text = format!("{error:#}");
        let trouble = crate::error::ReceiverTrouble::of(error);
        self.update(|s| {
            s.reconnects += 1;
            s.last_error = Some(text);
            s.last_trouble = Some(trouble);
        });
    }

    /// The receiver acknowledged `durable`, of which `confirmed` is confirmed. Called for every `Ack`:
    /// compares two positions instead of cloning the state as [`StatePublisher::update`] does.
    pub fn acknowledged(&self, durable: Lsn, confirmed: Lsn) {
        self.0.send_if_modified(|s| {
            let changed = (s.durable, s.confirmed) != (durable, confirmed);
            s.durable = durable;
            s.confirmed = confirmed;
            changed
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn watchers_see_each_change_and_only_changes() {
        let (p, mut rx) = StatePublisher::new();
        p.streaming(1, Lsn(0x100));
        assert!(rx.has_changed().unwrap());
        assert_eq!(rx.borrow_and_update().sessions, 1);
        p.acknowledged(Lsn(0x100), Lsn(0x100));
        assert!(
            !rx.has_changed().unwrap(),
            "nothing changed: nobody is woken"
        );
        p.acknowledged(Lsn(0x200), Lsn(0x180));
        let s = rx
            .wait_for(|s| s.durable >= Lsn(0x200))
            .await
            .unwrap()
            .clone();
        assert_eq!((s.durable, s.confirmed), (Lsn(0x200), Lsn(0x180)));
        p.reconnecting(&anyhow::anyhow!("receiver gone"));
        let s = rx.borrow_and_update().clone();
        assert_eq!(
            (s.reconnects, s.last_error.as_deref()),
            (1, Some("receiver gone"))
        );
    }
}
