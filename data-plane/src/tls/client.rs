//! Connections to upstreams: plain TCP for `http` targets, rustls for `https` ones, with the
//! upstream's trust roots, verification name and ALPN.

use std::sync::{Arc, OnceLock};

use hyper_rustls::{FixedServerNameResolver, HttpsConnector, HttpsConnectorBuilder};
use hyper_util::client::legacy::connect::HttpConnector;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::{ClientConfig, DigitallySignedStruct, RootCertStore, SignatureScheme};
use rustls_pki_types::{CertificateDer, ServerName, UnixTime};
use sluice_proto::pb;

use super::provider;

/// What every upstream's connection pool connects with.
pub type Connector = HttpsConnector<HttpConnector>;

/// The HTTP versions an upstream is offered over TLS (ALPN); without TLS the upstream's
/// protocol setting decides alone.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Alpn {
    /// `h2` and `http/1.1`: the upstream picks.
    Any,
    Http1,
    Http2,
}

/// A connector for an upstream's targets. `tls` applies to `https` targets; `http` targets
/// connect in the clear.
pub fn connector(
    tcp: HttpConnector,
    tls: Option<&pb::UpstreamTls>,
    alpn: Alpn,
) -> Result<Connector, String> {
    let config = client_config(tls)?;
    let builder = HttpsConnectorBuilder::new()
        .with_tls_config(config)
        .https_or_http();
    let builder = match tls.filter(|t| !t.server_name.is_empty()) {
        Some(t) => {
            let name = ServerName::try_from(t.server_name.clone())
                .map_err(|e| format!("tls.server_name {:?}: {e}", t.server_name))?;
            builder.with_server_name_resolver(FixedServerNameResolver::new(name))
        }
        None => builder,
    };
    Ok(match alpn {
        Alpn::Any => builder.enable_all_versions().wrap_connector(tcp),
        Alpn::Http1 => builder.enable_http1().wrap_connector(tcp),
        Alpn::Http2 => builder.enable_http2().wrap_connector(tcp),
    })
}

fn client_config(tls: Option<&pb::UpstreamTls>) -> Result<ClientConfig, String> {
    let provider = provider();
    let builder = ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?;
    let config = match tls {
        Some(t) if t.insecure_skip_verify => {
            // Said every time such an upstream is built: it is for tests, and a production
            // configuration that has it is one to hear about. It wins over `ca_pem`.
            tracing::warn!(
                ca_pem_ignored = !t.ca_pem.is_empty(),
                "an upstream's tls.insecure_skip_verify is set: its certificates are not verified"
            );
            builder
                .dangerous()
                .with_custom_certificate_verifier(Arc::new(NoVerification(provider)))
                .with_no_client_auth()
        }
        Some(t) if !t.ca_pem.is_empty() => {
            let mut roots = RootCertStore::empty();
            for (i, certificate) in sluice_proto::tls::parse_chain(&t.ca_pem)
                .map_err(|e| format!("tls.ca_pem: {e}"))?
                .into_iter()
                .enumerate()
            {
                roots
                    .add(certificate)
                    .map_err(|e| format!("tls.ca_pem: certificate {i} is not a usable CA: {e}"))?;
            }
            builder.with_root_certificates(roots).with_no_client_auth()
        }
        _ => builder
            .with_root_certificates(system_roots())
            .with_no_client_auth(),
    };
    Ok(config)
}

/// The operating system's trusted CAs, read once. Unreadable certificates are skipped (and
/// logged); an empty store only means `https` upstreams without `ca_pem` fail verification.
fn system_roots() -> Arc<RootCertStore> {
    static ROOTS: OnceLock<Arc<RootCertStore>> = OnceLock::new();
    ROOTS
        .get_or_init(|| {
            let found = rustls_native_certs::load_native_certs();
            for error in &found.errors {
                tracing::warn!(error = %error, "a system CA certificate could not be read");
            }
            let mut roots = RootCertStore::empty();
            let (added, ignored) = roots.add_parsable_certificates(found.certs);
            tracing::debug!(added, ignored, "system CA certificates loaded");
            Arc::new(roots)
        })
        .clone()
}

/// `insecure_skip_verify`: accepts any certificate. For tests against self-signed backends.
#[derive(Debug)]
struct NoVerification(Arc<CryptoProvider>);

impl ServerCertVerifier for NoVerification {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        _message: &[u8],
        _cert: &CertificateDer<'_>,
        _dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        Ok(HandshakeSignatureValid::assertion())
    }

    fn verify_tls13_signature(
        &self,
        _message: &[u8],
        _cert: &CertificateDer<'_>,
        _dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        Ok(HandshakeSignatureValid::assertion())
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}
