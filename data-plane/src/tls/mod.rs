//! TLS: the certificates the TLS listener presents, chosen by SNI from the running config
//! ([`CertificateStore`], [`SniResolver`]), and the TLS side of upstream connections
//! ([`client`]). rustls with the `ring` provider throughout.

pub mod client;

use std::collections::HashMap;
use std::sync::Arc;

use rustls::ServerConfig;
use rustls::crypto::CryptoProvider;
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use sluice_proto::pb;

use crate::auth::mtls::DeferredClientAuth;
use crate::config::ConfigStore;

/// The crypto provider every TLS config of the node is built with.
pub fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// The certificates of a configuration, by the server names they are presented for.
#[derive(Debug, Default)]
pub struct CertificateStore {
    exact: HashMap<String, Arc<CertifiedKey>>,
    /// By the suffix after `*.`: "*.example.com" is stored under "example.com".
    wildcard: HashMap<String, Arc<CertifiedKey>>,
    /// The certificate whose `snis` holds "*".
    default: Option<Arc<CertifiedKey>>,
    /// Each certificate's group and name, and its leaf's notAfter (Unix seconds), for the
    /// metric. A leaf the X.509 parser cannot read has none.
    pub expiries: Vec<(String, String, i64)>,
}

/// When `leaf` expires (Unix seconds), and a warning when it is served outside its dates:
/// clients refuse it, and the handshake failures they see name no cause the node could log.
/// (Served all the same: a certificate is replaced through the configuration, and a node must
/// not stop serving the other names of a configuration because one certificate lapsed.) Said
/// each time the configuration's certificates are loaded, while it lasts.
fn not_after_checked(
    certificate: &pb::Certificate,
    leaf: &rustls::pki_types::CertificateDer<'_>,
) -> Option<i64> {
    let (_, parsed) = x509_parser::parse_x509_certificate(leaf).ok()?;
    let validity = parsed.validity();
    let name = certificate.meta.as_ref().map_or("", |m| m.name.as_str());
    if !validity.is_valid() {
        tracing::warn!(
            certificate = name,
            not_before = %validity.not_before,
            not_after = %validity.not_after,
            "a certificate is served outside its validity dates: clients will refuse it"
        );
    }
    Some(validity.not_after.timestamp())
}

impl CertificateStore {
    /// Loads every certificate: each chain must parse and its key must be usable and match
    /// the leaf certificate. The error names the certificate and what is wrong with it.
    pub fn compile(certificates: &[pb::Certificate]) -> Result<Self, (usize, String)> {
        let provider = provider();
        let mut store = CertificateStore::default();
        for (i, certificate) in certificates.iter().enumerate() {
            let chain = sluice_proto::tls::parse_chain(&certificate.cert_pem)
                .map_err(|e| (i, format!("cert_pem: {e}")))?;
            let key = sluice_proto::tls::parse_private_key(&certificate.key_pem)
                .map_err(|e| (i, format!("key_pem: {e}")))?;
            if let Some(not_after) = not_after_checked(certificate, &chain[0]) {
                let meta = certificate.meta.clone().unwrap_or_default();
                store.expiries.push((meta.group, meta.name, not_after));
            }
            let key = CertifiedKey::from_der(chain, key, &provider).map_err(|e| {
                (
                    i,
                    format!("key_pem: cannot be used with cert_pem's certificate: {e}"),
                )
            })?;
            let key = Arc::new(key);
            for sni in &certificate.snis {
                let sni = sni.to_ascii_lowercase();
                // The validator keeps names unique within a group; a node serving several
                // groups (a standalone file) must not pick between two certificates either.
                let taken = if sni == "*" {
                    store.default.replace(key.clone()).is_some()
                } else if let Some(suffix) = sni.strip_prefix("*.") {
                    store
                        .wildcard
                        .insert(suffix.to_owned(), key.clone())
                        .is_some()
                } else {
                    store.exact.insert(sni.clone(), key.clone()).is_some()
                };
                if taken {
                    return Err((
                        i,
                        format!("snis: {sni:?} is also served by a certificate of another group"),
                    ));
                }
            }
        }
        Ok(store)
    }

    /// The certificate for a client's SNI: an exact name first, then a one-label wildcard,
    /// then the default.
    pub fn resolve(&self, server_name: Option<&str>) -> Option<Arc<CertifiedKey>> {
        if let Some(name) = server_name {
            let name = name.trim_end_matches('.').to_ascii_lowercase();
            if let Some(key) = self.exact.get(&name) {
                return Some(key.clone());
            }
            if let Some((_, parent)) = name.split_once('.')
                && let Some(key) = self.wildcard.get(parent)
            {
                return Some(key.clone());
            }
        }
        self.default.clone()
    }

    pub fn is_empty(&self) -> bool {
        self.exact.is_empty() && self.wildcard.is_empty() && self.default.is_none()
    }
}

/// Picks each handshake's certificate from the configuration running at that moment, so a
/// certificate change takes effect on the next handshake without re-binding the listener.
#[derive(Debug)]
pub struct SniResolver {
    store: Arc<ConfigStore>,
}

impl ResolvesServerCert for SniResolver {
    fn resolve(&self, client_hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        let config = self.store.current()?;
        let key = config.certificates.resolve(client_hello.server_name());
        if key.is_none() {
            tracing::debug!(
                sni = client_hello.server_name(),
                "no certificate for this server name and no default: handshake refused"
            );
        }
        key
    }
}

/// The TLS listener's configuration: TLS 1.2 and 1.3, ALPN `h2` then `http/1.1`, the
/// certificate chosen per handshake by [`SniResolver`], and client certificates asked for
/// while the configuration has an `mtls` policy ([`DeferredClientAuth`]).
pub fn server_config(store: Arc<ConfigStore>) -> Result<Arc<ServerConfig>, rustls::Error> {
    let provider = provider();
    let mut config = ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()?
        .with_client_cert_verifier(Arc::new(DeferredClientAuth::new(store.clone(), provider)))
        .with_cert_resolver(Arc::new(SniResolver { store }));
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}
