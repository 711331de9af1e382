//! The sender's typed failures: what a reconnect cannot fix, decided where it is found.

/// A failure that reconnecting cannot fix: the server (or the configuration) is not one walship can ship
/// from as it stands. Carried inside the `anyhow` chain; a session stops on it with its message, which says
/// what to do, instead of retrying. Decided where the failure is found, never by matching message text.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct Unfixable(pub String);

impl Unfixable {
    /// Whether `e` (or a cause of it) is unfixable.
    pub fn is_in(e: &anyhow::Error) -> bool {
        e.chain().any(|c| c.is::<Unfixable>())
    }
}
