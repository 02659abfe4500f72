//! Encrypting the private keys amslb keeps in shared storage (MongoDB):
//! AES-256-GCM with a random nonce per write, from aws-lc-rs (already the
//! TLS provider, so no new crypto dependency), keyed by
//! `[tls.acme] storage_key_file`.
//!
//! A sealed value is the 12-byte nonce followed by the ciphertext and tag.
//! The additional data names what the value is (say "certificate key for
//! live.example.com"), so a value copied into another document does not open.

use crate::config::tls::STORAGE_KEY_LEN;
use aws_lc_rs::aead::{AES_256_GCM, Aad, NONCE_LEN, Nonce, RandomizedNonceKey};

/// The storage key, ready to seal and open.
pub struct StorageKey(RandomizedNonceKey);

impl std::fmt::Debug for StorageKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never print key material.
        f.write_str("StorageKey(..)")
    }
}

impl StorageKey {
    /// A key from its 32 bytes.
    pub fn new(bytes: &[u8; STORAGE_KEY_LEN]) -> Self {
        // AES-256 takes exactly these 32 bytes; no other input can fail.
        match RandomizedNonceKey::new(&AES_256_GCM, bytes) {
            Ok(key) => Self(key),
            Err(_) => unreachable!("AES-256-GCM accepts any 32-byte key"),
        }
    }

    /// Encrypts `plain`, bound to `what`.
    pub fn seal(&self, what: &str, plain: &[u8]) -> Result<Vec<u8>, String> {
        let mut data = plain.to_vec();
        let nonce = self
            .0
            .seal_in_place_append_tag(Aad::from(what.as_bytes()), &mut data)
            .map_err(|_| format!("cannot encrypt the {what}"))?;
        let mut sealed = nonce.as_ref().to_vec();
        sealed.extend_from_slice(&data);
        Ok(sealed)
    }

    /// Decrypts a value [`StorageKey::seal`] made for `what`; an error when
    /// it was sealed with another key, for something else, or altered.
    pub fn open(&self, what: &str, sealed: &[u8]) -> Result<Vec<u8>, String> {
        let refused = || {
            format!("cannot decrypt the {what}: another storage_key_file, or altered in storage")
        };
        if sealed.len() < NONCE_LEN {
            return Err(refused());
        }
        let (nonce, cipher) = sealed.split_at(NONCE_LEN);
        let nonce = Nonce::try_assume_unique_for_key(nonce).map_err(|_| refused())?;
        let mut data = cipher.to_vec();
        let plain = self
            .0
            .open_in_place(nonce, Aad::from(what.as_bytes()), &mut data)
            .map_err(|_| refused())?;
        Ok(plain.to_vec())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn opens_only_with_its_key_and_purpose() {
        let key = StorageKey::new(&[1; STORAGE_KEY_LEN]);
        let sealed = key.seal("certificate key for a", b"secret").unwrap();
        assert!(
            !sealed.windows(6).any(|w| w == b"secret"),
            "stored in clear"
        );
        assert_eq!(
            key.open("certificate key for a", &sealed).unwrap(),
            b"secret"
        );
        // Another document's purpose, another key, a flipped bit, a stub.
        assert!(key.open("certificate key for b", &sealed).is_err());
        let other = StorageKey::new(&[2; STORAGE_KEY_LEN]);
        assert!(other.open("certificate key for a", &sealed).is_err());
        let mut altered = sealed.clone();
        let last = altered.len() - 1;
        altered[last] ^= 1;
        assert!(key.open("certificate key for a", &altered).is_err());
        assert!(key.open("certificate key for a", &sealed[..5]).is_err());
        // A fresh nonce each time.
        assert_ne!(
            key.seal("x", b"same").unwrap(),
            key.seal("x", b"same").unwrap()
        );
    }
}
