//! Client certificates: asked for on the TLS listener, checked against each `mtls` policy's
//! CAs on the routes that have one, and mapped to a consumer by fingerprint or subject.
//!
//! The handshake proves the client holds the certificate's key, and nothing more: which CAs
//! a certificate must chain to depends on the route, which is known only once the request
//! is read. So the listener takes any certificate ([`DeferredClientAuth`]) and each route's
//! policy verifies the chain ([`MtlsAuth::verify`]), answering 401 with a reason rather than
//! failing the handshake with none.

use std::sync::Arc;

use rustls::client::danger::HandshakeSignatureValid;
use rustls::crypto::CryptoProvider;
use rustls::server::WebPkiClientVerifier;
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::{CertificateError, DigitallySignedStruct, DistinguishedName, RootCertStore};
use rustls_pki_types::{CertificateDer, UnixTime};
use sha2::{Digest, Sha256};
use sluice_proto::pb;

use crate::config::ConfigStore;

/// The certificate chain a client presented in its handshake, with what identifies it.
#[derive(Debug, Clone)]
pub struct ClientCertificate {
    chain: Vec<CertificateDer<'static>>,
    /// SHA-256 of the leaf certificate, lowercase hex.
    pub fingerprint_sha256: String,
    /// The leaf's subject distinguished name ([`subject_string`]: `CN=acme-client, O=Acme`);
    /// `None` when the certificate does not parse.
    pub subject: Option<String>,
}

impl ClientCertificate {
    /// `None` for an empty chain (no certificate).
    pub fn from_chain(chain: &[CertificateDer<'_>]) -> Option<Self> {
        let leaf = chain.first()?;
        let subject = x509_parser::parse_x509_certificate(leaf)
            .ok()
            .and_then(|(_, certificate)| subject_string(certificate.subject()));
        Some(ClientCertificate {
            fingerprint_sha256: hex::encode(Sha256::digest(leaf)),
            subject,
            chain: chain.iter().map(|c| c.clone().into_owned()).collect(),
        })
    }
}

/// A distinguished name as `x509-parser` prints it (attributes in certificate order, `, `
/// between RDNs, ` + ` within one), but with each string value escaped as RFC 4514 says, so
/// that no value can pass for several attributes: a CN of `a, O=Acme` reads `CN=a\, O=Acme`,
/// not `CN=a, O=Acme`. Names with no such characters read as `x509-parser` prints them.
/// `None` for a value that does not decode.
fn subject_string(name: &x509_parser::x509::X509Name<'_>) -> Option<String> {
    use x509_parser::der_parser::asn1_rs::Tag;
    let registry = x509_parser::objects::oid_registry();
    let mut out = String::new();
    for (i, rdn) in name.iter().enumerate() {
        if i > 0 {
            out.push_str(", ");
        }
        for (j, attribute) in rdn.iter().enumerate() {
            if j > 0 {
                out.push_str(" + ");
            }
            match x509_parser::objects::oid2abbrev(attribute.attr_type(), registry) {
                Ok(abbreviation) => out.push_str(abbreviation),
                Err(_) => out.push_str(&format!("{:?}", attribute.attr_type())),
            }
            out.push('=');
            let value = attribute.attr_value();
            let text = match value.tag() {
                Tag::NumericString
                | Tag::VisibleString
                | Tag::PrintableString
                | Tag::GeneralString
                | Tag::ObjectDescriptor
                | Tag::GraphicString
                | Tag::T61String
                | Tag::VideotexString
                | Tag::Utf8String
                | Tag::Ia5String => std::str::from_utf8(value.data).ok()?.to_owned(),
                // UTF-16 code units: an odd byte out is no string at all.
                Tag::BmpString if value.data.len() % 2 != 0 => return None,
                Tag::BmpString => {
                    let units = value
                        .data
                        .chunks_exact(2)
                        .map(|pair| u16::from_be_bytes([pair[0], pair[1]]));
                    char::decode_utf16(units)
                        .collect::<Result<String, _>>()
                        .ok()?
                }
                // Not a string: `#` and its DER encoding in hex (RFC 4514 section 2.4). The `#`
                // keeps it apart from a string of the same characters, whose leading `#` would
                // be escaped.
                _ => {
                    use x509_parser::der_parser::asn1_rs::ToDer;
                    out.push('#');
                    out.push_str(&hex::encode_upper(value.to_der_vec().ok()?));
                    continue;
                }
            };
            escape_rfc4514(&text, &mut out);
        }
    }
    Some(out)
}

/// Appends `value` escaped as an RFC 4514 attribute value.
fn escape_rfc4514(value: &str, out: &mut String) {
    let last = value.chars().count().saturating_sub(1);
    for (i, c) in value.chars().enumerate() {
        match c {
            '"' | '+' | ',' | ';' | '<' | '>' | '\\' => {
                out.push('\\');
                out.push(c);
            }
            '#' if i == 0 => out.push_str("\\#"),
            ' ' if i == 0 || i == last => out.push_str("\\ "),
            '\0' => out.push_str("\\00"),
            c => out.push(c),
        }
    }
}

/// One `mtls` policy: the CAs its client certificates must chain to, each with a verifier of
/// its own, so that a verified chain names the CA it leads to (a credential may be tied to
/// one: [`pb::MtlsCredential::ca_sha256`]).
#[derive(Debug, Clone)]
pub struct MtlsAuth {
    /// (the CA certificate's SHA-256, lowercase hex; a verifier trusting that CA alone)
    anchors: Vec<(String, Arc<dyn ClientCertVerifier>)>,
}

/// Why a certificate was refused: a reason code and what to tell the client.
pub type CertificateRefusal = (&'static str, String);

impl MtlsAuth {
    pub fn compile(policy: &pb::MtlsPolicy) -> Result<Self, String> {
        let cas =
            sluice_proto::tls::parse_chain(&policy.ca_pem).map_err(|e| format!("ca_pem: {e}"))?;
        let mut anchors = Vec::with_capacity(cas.len());
        for (i, ca) in cas.into_iter().enumerate() {
            let fingerprint = hex::encode(Sha256::digest(&ca));
            let mut roots = RootCertStore::empty();
            roots
                .add(ca)
                .map_err(|e| format!("ca_pem: certificate {i} cannot be a trust anchor: {e}"))?;
            let verifier = WebPkiClientVerifier::builder_with_provider(
                Arc::new(roots),
                crate::tls::provider(),
            )
            .build()
            .map_err(|e| format!("ca_pem: {e}"))?;
            anchors.push((fingerprint, verifier));
        }
        Ok(MtlsAuth { anchors })
    }

    /// Checks that `certificate` chains to the policy's CAs, is valid now and is meant for
    /// client authentication; the SHA-256 of each CA it chains to (more than one when the
    /// policy lists a root and its intermediate, or cross-signed CAs).
    pub fn verify(&self, certificate: &ClientCertificate) -> Result<Vec<&str>, CertificateRefusal> {
        let (leaf, intermediates) = certificate
            .chain
            .split_first()
            .ok_or(("missing_credential", "no client certificate".to_owned()))?;
        let now = UnixTime::now();
        let mut anchors = Vec::new();
        let mut refusal = None;
        for (fingerprint, verifier) in &self.anchors {
            match verifier.verify_client_cert(leaf, intermediates, now) {
                Ok(_) => anchors.push(fingerprint.as_str()),
                // Another CA's: the chain may lead to the next one.
                Err(rustls::Error::InvalidCertificate(CertificateError::UnknownIssuer))
                    if refusal.is_some() => {}
                // The most telling refusal: the CA the chain leads to says why (expired, say)
                // where the others only do not know its issuer.
                Err(e) => {
                    let unknown_issuer = matches!(
                        e,
                        rustls::Error::InvalidCertificate(CertificateError::UnknownIssuer)
                    );
                    if refusal.is_none() || !unknown_issuer {
                        refusal = Some(e);
                    }
                }
            }
        }
        if !anchors.is_empty() {
            return Ok(anchors);
        }
        let e = refusal.unwrap_or(rustls::Error::InvalidCertificate(
            CertificateError::UnknownIssuer,
        ));
        let reason = match &e {
            rustls::Error::InvalidCertificate(
                CertificateError::Expired | CertificateError::ExpiredContext { .. },
            ) => "certificate_expired",
            rustls::Error::InvalidCertificate(
                CertificateError::NotValidYet | CertificateError::NotValidYetContext { .. },
            ) => "certificate_not_yet_valid",
            _ => "certificate_untrusted",
        };
        Err((reason, format!("the client certificate is refused: {e}")))
    }
}

/// The TLS listener's client-certificate verifier: asks for a certificate while the running
/// configuration has an `mtls` policy (browsers would otherwise prompt their users), never
/// requires one, and checks only that the client holds the certificate's key. The chain is
/// verified per route by [`MtlsAuth::verify`].
#[derive(Debug)]
pub struct DeferredClientAuth {
    store: Arc<ConfigStore>,
    provider: Arc<CryptoProvider>,
}

impl DeferredClientAuth {
    pub fn new(store: Arc<ConfigStore>, provider: Arc<CryptoProvider>) -> Self {
        DeferredClientAuth { store, provider }
    }
}

impl ClientCertVerifier for DeferredClientAuth {
    fn offer_client_auth(&self) -> bool {
        self.store
            .current()
            .is_some_and(|config| config.access.asks_for_certificates())
    }

    fn client_auth_mandatory(&self) -> bool {
        false
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        // No hints: a route's CAs are not known at the handshake, and clients send the
        // certificate they are configured with whatever the hints say.
        &[]
    }

    fn verify_client_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        Ok(ClientCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn subject_of(name: &[(rcgen::DnType, &str)]) -> Option<String> {
        let mut params = rcgen::CertificateParams::default();
        params.distinguished_name = rcgen::DistinguishedName::new();
        for (kind, value) in name {
            params.distinguished_name.push(kind.clone(), *value);
        }
        let key = rcgen::KeyPair::generate().unwrap();
        let certificate = params.self_signed(&key).unwrap();
        ClientCertificate::from_chain(&[certificate.der().clone()])
            .unwrap()
            .subject
    }

    #[test]
    fn subjects_read_as_before_and_no_value_passes_for_several_attributes() {
        use rcgen::DnType::{CommonName, OrganizationName};
        let plain = subject_of(&[(CommonName, "acme-client"), (OrganizationName, "Acme")]);
        assert_eq!(plain.as_deref(), Some("CN=acme-client, O=Acme"));
        let forged = subject_of(&[(CommonName, "acme-client, O=Acme")]);
        assert_eq!(forged.as_deref(), Some(r"CN=acme-client\, O=Acme"));
        let odd = subject_of(&[(CommonName, " #a+b;c<d>e\"quoted\"\\ ")]);
        assert_eq!(odd.as_deref(), Some(r#"CN=\ #a\+b\;c\<d\>e\"quoted\"\\\ "#));
    }

    #[test]
    fn a_value_that_is_not_a_string_reads_as_hex_after_a_hash() {
        // UniversalString is not among the strings read as text: its DER in hex, after `#`,
        // so that it never reads as the PrintableString of the same hex digits.
        let mut params = rcgen::CertificateParams::default();
        params.distinguished_name = rcgen::DistinguishedName::new();
        let value = rcgen::string::UniversalString::try_from("ab").unwrap();
        params.distinguished_name.push(
            rcgen::DnType::CommonName,
            rcgen::DnValue::UniversalString(value),
        );
        let key = rcgen::KeyPair::generate().unwrap();
        let certificate = params.self_signed(&key).unwrap();
        let subject = ClientCertificate::from_chain(&[certificate.der().clone()])
            .unwrap()
            .subject;
        assert_eq!(subject.as_deref(), Some("CN=#1C080000006100000062"));
        let printable = subject_of(&[(rcgen::DnType::CommonName, "1C080000006100000062")]);
        assert_ne!(printable, subject);
    }
}
