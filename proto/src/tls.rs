//! PEM parsing for certificates and keys in configuration, shared by the validator (which
//! names what is wrong) and the data plane (which loads what was validated).

use rustls_pki_types::pem::{self, PemObject};
use rustls_pki_types::{CertificateDer, PrivateKeyDer};

/// The certificates of a PEM bundle, in order; at least one, and nothing that is not PEM.
pub fn parse_chain(pem_text: &str) -> Result<Vec<CertificateDer<'static>>, String> {
    let chain = CertificateDer::pem_slice_iter(pem_text.as_bytes())
        .enumerate()
        .map(|(i, item)| item.map_err(|e| format!("certificate {i} of the PEM text: {}", why(e))))
        .collect::<Result<Vec<_>, _>>()?;
    if chain.is_empty() {
        return Err("holds no PEM certificate (-----BEGIN CERTIFICATE-----)".into());
    }
    Ok(chain)
}

/// The one private key of a PEM text (PKCS#8, PKCS#1 or SEC1).
pub fn parse_private_key(pem_text: &str) -> Result<PrivateKeyDer<'static>, String> {
    PrivateKeyDer::from_pem_slice(pem_text.as_bytes()).map_err(|e| match e {
        pem::Error::NoItemsFound => {
            "holds no PEM private key (-----BEGIN PRIVATE KEY-----, RSA PRIVATE KEY or EC PRIVATE KEY)"
                .to_owned()
        }
        e => why(e),
    })
}

fn why(error: pem::Error) -> String {
    match error {
        pem::Error::NoItemsFound => "no PEM item found".into(),
        e => format!("is not valid PEM: {e}"),
    }
}
