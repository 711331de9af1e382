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

/// The receiver refused this sender in its answer to `Hello`.
#[derive(Debug, thiserror::Error)]
#[error("the receiver refused this sender: {reason}")]
pub struct Refused {
    pub code: walship_protocol::RefuseCode,
    pub reason: String,
}

/// What went wrong between this sender and its receiver, read off the error's types (never its text), for
/// the fix `check` prints.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ReceiverTrouble {
    /// The receiver's certificate is not signed by `--tls-ca`, or does not carry `--tls-server-name`.
    ServerCertificate,
    /// The receiver ended the TLS session with an alert: it does not trust this sender's certificate.
    ClientCertificate,
    /// The receiver's archive belongs to another cluster.
    ForeignCluster,
    /// Anything else (unreachable, refused for another reason, the network).
    Other,
}

impl ReceiverTrouble {
    pub fn of(e: &anyhow::Error) -> ReceiverTrouble {
        for cause in e.chain() {
            if let Some(r) = cause.downcast_ref::<Refused>() {
                if r.code == walship_protocol::RefuseCode::ForeignCluster {
                    return ReceiverTrouble::ForeignCluster;
                }
            }
            let tls = cause
                .downcast_ref::<std::io::Error>()
                .and_then(|io| io.get_ref())
                .and_then(|inner| inner.downcast_ref::<rustls::Error>())
                .or_else(|| cause.downcast_ref::<rustls::Error>());
            match tls {
                Some(rustls::Error::InvalidCertificate(_)) => {
                    return ReceiverTrouble::ServerCertificate
                }
                Some(rustls::Error::AlertReceived(_)) => return ReceiverTrouble::ClientCertificate,
                _ => {}
            }
        }
        ReceiverTrouble::Other
    }

    /// What to do about it.
    pub fn fix(self) -> &'static str {
        match self {
            ReceiverTrouble::ServerCertificate => {
                "--tls-ca must be the CA that signed the receiver's certificate (ca.crt of the receiver's set), and \
                 --tls-server-name a name that certificate carries"
            }
            ReceiverTrouble::ClientCertificate => {
                "the receiver trusts another CA: issue this sender a certificate with `walship-receiver certs --add-client NAME` \
                 from the receiver's CA"
            }
            ReceiverTrouble::ForeignCluster => {
                "the receiver's archive belongs to another cluster: give this cluster an archive of its own (an empty directory)"
            }
            ReceiverTrouble::Other => {
                "is walship-receiver running there, and do --receiver and the firewall let this host reach it?"
            }
        }
    }
}
