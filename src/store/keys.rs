//! Keys: the volume's random data key, its wrapping by a key-encryption key
//! derived from a passphrase (Argon2id) or a key file (HKDF), and per-purpose
//! AES-256-GCM subkeys derived from the data key with HKDF-SHA256.
//!
//! Nonce discipline (argued in docs/ARCHITECTURE.md): every subkey is bound
//! to one object name; objects written once per name (segments, checkpoints)
//! use deterministic counters, objects that may be attempted by several
//! writers under one name (epoch claims) use random nonces. Objects of an
//! epoch are also bound to its writer's claim token (docs/rfcs/0001), so
//! two writers of one epoch never share a key.

use std::collections::BTreeMap;
use std::sync::Arc;

use aes_gcm::aead::{Aead as _, AeadInPlace as _, KeyInit, Payload};
use aes_gcm::{Aes256Gcm, Nonce};
use hkdf::Hkdf;
use parking_lot::RwLock;
use serde::{Deserialize, Serialize};
use sha2::Sha256;
use zeroize::{Zeroize, ZeroizeOnDrop, Zeroizing};

use crate::error::{Error, Result};

pub const KEY_LEN: usize = 32;
pub const TAG_LEN: usize = 16;
pub const NONCE_LEN: usize = 12;
/// Minimum size of a key file: the whole entropy of one AES-256 key.
pub const MIN_KEY_FILE_LEN: usize = 32;

/// The volume's data key. Never stored unwrapped.
#[derive(Clone, Zeroize, ZeroizeOnDrop)]
pub struct DataKey([u8; KEY_LEN]);

impl DataKey {
    pub fn random() -> Self {
        DataKey(rand::random())
    }
}

/// What the user proves knowledge of.
pub enum Secret {
    Passphrase(Zeroizing<Vec<u8>>),
    KeyFile(Zeroizing<Vec<u8>>),
}

impl Secret {
    /// A passphrase as typed or read from a file: one trailing newline is
    /// dropped (files made with `echo` have one).
    pub fn passphrase(mut bytes: Vec<u8>) -> Result<Self> {
        if bytes.ends_with(b"\n") {
            bytes.pop();
            if bytes.ends_with(b"\r") {
                bytes.pop();
            }
        }
        if bytes.is_empty() {
            return Err(Error::InvalidArgument("the passphrase is empty".into()));
        }
        Ok(Secret::Passphrase(Zeroizing::new(bytes)))
    }

    pub fn key_file(bytes: Vec<u8>) -> Result<Self> {
        if bytes.len() < MIN_KEY_FILE_LEN {
            return Err(Error::InvalidArgument(format!(
                "key file is {} bytes; it must hold at least {MIN_KEY_FILE_LEN} random bytes \
                 (make one with: head -c 32 /dev/urandom > volume.key)",
                bytes.len()
            )));
        }
        Ok(Secret::KeyFile(Zeroizing::new(bytes)))
    }
}

/// Argon2id cost. The default costs about a quarter second and 64 MiB once
/// per open; tests use a cheap one.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Argon2Cost {
    pub m_cost_kib: u32,
    pub t_cost: u32,
    pub p_cost: u32,
}

impl Argon2Cost {
    /// Most memory an open may spend on Argon2: 1 GiB.
    pub const MAX_M_COST_KIB: u32 = 1 << 20;
    /// Most passes: 16 (at 1 GiB, tens of seconds).
    pub const MAX_T_COST: u32 = 16;
    /// Most lanes: 8.
    pub const MAX_P_COST: u32 = 8;

    /// The costs are read from the superblock, which is not authenticated
    /// before the key is derived: a tampered bucket must not make an open
    /// allocate gigabytes or spin for hours. `create` enforces the same
    /// bounds, so every volume made here opens.
    pub fn check(&self) -> Result<()> {
        if self.m_cost_kib > Self::MAX_M_COST_KIB
            || self.t_cost > Self::MAX_T_COST
            || self.p_cost > Self::MAX_P_COST
            || self.m_cost_kib == 0
            || self.t_cost == 0
            || self.p_cost == 0
        {
            return Err(Error::Format(format!(
                "Argon2 cost out of bounds (memory {} KiB, {} passes, {} lanes; at most {} KiB, {} passes, {} lanes): refusing to derive the key",
                self.m_cost_kib,
                self.t_cost,
                self.p_cost,
                Self::MAX_M_COST_KIB,
                Self::MAX_T_COST,
                Self::MAX_P_COST
            )));
        }
        Ok(())
    }
}

impl Default for Argon2Cost {
    fn default() -> Self {
        Argon2Cost {
            m_cost_kib: 64 * 1024,
            t_cost: 3,
            p_cost: 1,
        }
    }
}

/// How the key-encryption key is derived; stored (public) in the superblock.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "kebab-case")]
pub enum KdfParams {
    Argon2id {
        #[serde(flatten)]
        cost: Argon2Cost,
        salt: String,
    },
    KeyFile {
        salt: String,
    },
}

impl KdfParams {
    pub fn for_secret(secret: &Secret, cost: Argon2Cost) -> Self {
        let salt = hex::encode(rand::random::<[u8; 16]>());
        match secret {
            Secret::Passphrase(_) => KdfParams::Argon2id { cost, salt },
            Secret::KeyFile(_) => KdfParams::KeyFile { salt },
        }
    }

    /// Derive the key-encryption key.
    pub fn derive_kek(&self, secret: &Secret) -> Result<Zeroizing<[u8; KEY_LEN]>> {
        let mut kek = Zeroizing::new([0u8; KEY_LEN]);
        match (self, secret) {
            (KdfParams::Argon2id { cost, salt }, Secret::Passphrase(pass)) => {
                cost.check()?;
                let salt = decode_hex(salt)?;
                let params =
                    argon2::Params::new(cost.m_cost_kib, cost.t_cost, cost.p_cost, Some(KEY_LEN))
                        .map_err(|e| Error::Format(format!("invalid Argon2 parameters: {e}")))?;
                argon2::Argon2::new(argon2::Algorithm::Argon2id, argon2::Version::V0x13, params)
                    .hash_password_into(pass, &salt, kek.as_mut())
                    .map_err(|e| Error::Format(format!("Argon2 failed: {e}")))?;
            }
            (KdfParams::KeyFile { salt }, Secret::KeyFile(bytes)) => {
                let salt = decode_hex(salt)?;
                Hkdf::<Sha256>::new(Some(&salt), bytes)
                    .expand(b"zerofs-ublk/v1/kek/key-file", kek.as_mut())
                    .expect("32 bytes is a valid HKDF length");
            }
            (KdfParams::Argon2id { .. }, Secret::KeyFile(_)) => {
                return Err(Error::InvalidArgument(
                    "this volume is protected by a passphrase, not a key file".into(),
                ));
            }
            (KdfParams::KeyFile { .. }, Secret::Passphrase(_)) => {
                return Err(Error::InvalidArgument(
                    "this volume is protected by a key file, not a passphrase".into(),
                ));
            }
        }
        Ok(kek)
    }
}

fn decode_hex(s: &str) -> Result<Vec<u8>> {
    hex::decode(s).map_err(|_| Error::Format("superblock has a malformed hex field".into()))
}

/// The data key encrypted under the key-encryption key.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WrappedKey {
    pub nonce: String,
    pub ciphertext: String,
}

impl WrappedKey {
    /// Wrap with a random nonce: each (re)wrap uses a fresh salt, hence a
    /// fresh KEK, so a random nonce is never reused under one key.
    pub fn wrap(kek: &[u8; KEY_LEN], key: &DataKey, aad: &[u8]) -> Self {
        let cipher = Aes256Gcm::new_from_slice(kek).expect("key length");
        let nonce: [u8; NONCE_LEN] = rand::random();
        let ct = cipher
            .encrypt(Nonce::from_slice(&nonce), Payload { msg: &key.0, aad })
            .expect("AES-GCM encryption cannot fail for small inputs");
        WrappedKey {
            nonce: hex::encode(nonce),
            ciphertext: hex::encode(ct),
        }
    }

    pub fn unwrap(&self, kek: &[u8; KEY_LEN], aad: &[u8]) -> Result<DataKey> {
        let cipher = Aes256Gcm::new_from_slice(kek).expect("key length");
        let nonce = decode_hex(&self.nonce)?;
        let ct = decode_hex(&self.ciphertext)?;
        if nonce.len() != NONCE_LEN {
            return Err(Error::Format(
                "superblock key nonce has the wrong length".into(),
            ));
        }
        let pt = Zeroizing::new(
            cipher
                .decrypt(Nonce::from_slice(&nonce), Payload { msg: &ct, aad })
                .map_err(|_| Error::WrongKey)?,
        );
        let bytes: [u8; KEY_LEN] = pt
            .as_slice()
            .try_into()
            .map_err(|_| Error::Format("wrapped key has the wrong length".into()))?;
        Ok(DataKey(bytes))
    }
}

/// An AES-256-GCM key for one purpose and one object.
#[derive(Clone)]
pub struct SubKey {
    cipher: Aes256Gcm,
    /// A fingerprint of the key (for the key-use log; not secret-bearing
    /// beyond what equality of keys reveals to this process).
    id: u64,
}

/// Test instrumentation for docs/rfcs/0001: while on, every encryption
/// under a deterministic nonce is recorded as (key, nonce) → digest of
/// (AAD, plaintext); a second, different message under one pair — the
/// AES-GCM failure the RFC removes — is counted. Process-wide: one test
/// binary at a time should use it.
#[doc(hidden)]
pub mod key_use {
    use std::collections::HashMap;
    use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

    use parking_lot::Mutex;

    use super::NONCE_LEN;

    static ON: AtomicBool = AtomicBool::new(false);
    static REUSES: AtomicU64 = AtomicU64::new(0);
    /// (key fingerprint, nonce) → digest of the first message under it.
    type Log = HashMap<(u64, [u8; NONCE_LEN]), u64>;
    static LOG: Mutex<Option<Log>> = Mutex::new(None);

    /// Start (or restart) recording with an empty log.
    pub fn start() {
        *LOG.lock() = Some(HashMap::new());
        REUSES.store(0, Ordering::SeqCst);
        ON.store(true, Ordering::SeqCst);
    }

    /// (key, nonce) pairs that encrypted two different messages so far.
    pub fn reuses() -> u64 {
        REUSES.load(Ordering::SeqCst)
    }

    pub(super) fn note(key: u64, nonce: &[u8; NONCE_LEN], aad: &[u8], msg: &[u8]) {
        if !ON.load(Ordering::Relaxed) {
            return;
        }
        use std::hash::{Hash, Hasher};
        let mut h = std::collections::hash_map::DefaultHasher::new();
        aad.hash(&mut h);
        msg.hash(&mut h);
        let digest = h.finish();
        if let Some(log) = LOG.lock().as_mut() {
            let seen = *log.entry((key, *nonce)).or_insert(digest);
            if seen != digest {
                REUSES.fetch_add(1, Ordering::SeqCst);
            }
        }
    }
}

/// Nonce domains keep the nonce spaces of different uses of one subkey apart.
pub mod domain {
    pub const FRAME: u32 = 0;
    pub const TABLE: u32 = 1;
    pub const JOURNAL: u32 = 2;
    pub const JOURNAL_HEADER: u32 = 3;
}

/// A deterministic nonce: 4-byte domain + 8-byte counter.
pub fn counter_nonce(domain: u32, counter: u64) -> [u8; NONCE_LEN] {
    let mut n = [0u8; NONCE_LEN];
    n[..4].copy_from_slice(&domain.to_be_bytes());
    n[4..].copy_from_slice(&counter.to_be_bytes());
    n
}

impl SubKey {
    /// HKDF-SHA256(data key, salt = volume id, info = purpose || object).
    pub fn derive(key: &DataKey, volume_id: &[u8], purpose: &str, object: &str) -> Self {
        Self::expand(
            key,
            volume_id,
            &format!("zerofs-ublk/v1/{purpose}/{object}"),
        )
    }

    /// The same, bound to the claim token of the writer that owns the
    /// object's epoch (docs/rfcs/0001): two writers of one epoch — a
    /// backend without conditional create, two copies of a bucket — never
    /// share a key, however their object names collide.
    pub fn derive_bound(
        key: &DataKey,
        volume_id: &[u8],
        purpose: &str,
        object: &str,
        token: &str,
    ) -> Self {
        let info = format!("zerofs-ublk/v3/{purpose}/{object}/{token}");
        Self::expand(key, volume_id, &info)
    }

    fn expand(key: &DataKey, volume_id: &[u8], info: &str) -> Self {
        let mut okm = Zeroizing::new([0u8; KEY_LEN]);
        Hkdf::<Sha256>::new(Some(volume_id), &key.0)
            .expand(info.as_bytes(), okm.as_mut())
            .expect("32 bytes is a valid HKDF length");
        let id = {
            use std::hash::{Hash, Hasher};
            let mut h = std::collections::hash_map::DefaultHasher::new();
            okm.as_ref().hash(&mut h);
            h.finish()
        };
        SubKey {
            cipher: Aes256Gcm::new_from_slice(okm.as_ref()).expect("key length"),
            id,
        }
    }

    /// Encrypt `msg`; output is ciphertext followed by the 16-byte tag.
    pub fn encrypt(&self, nonce: &[u8; NONCE_LEN], aad: &[u8], msg: &[u8]) -> Vec<u8> {
        key_use::note(self.id, nonce, aad, msg);
        self.encrypt_unrecorded(nonce, aad, msg)
    }

    fn encrypt_unrecorded(&self, nonce: &[u8; NONCE_LEN], aad: &[u8], msg: &[u8]) -> Vec<u8> {
        self.cipher
            .encrypt(Nonce::from_slice(nonce), Payload { msg, aad })
            .expect("AES-GCM encryption cannot fail below 64 GiB")
    }

    /// Decrypt and authenticate; `None` when the bytes are not authentic.
    pub fn decrypt(&self, nonce: &[u8; NONCE_LEN], aad: &[u8], ct: &[u8]) -> Option<Vec<u8>> {
        self.cipher
            .decrypt(Nonce::from_slice(nonce), Payload { msg: ct, aad })
            .ok()
    }

    /// Encrypt `buf` where it lies (no copy); returns the tag.
    pub fn encrypt_in_place(
        &self,
        nonce: &[u8; NONCE_LEN],
        aad: &[u8],
        buf: &mut [u8],
    ) -> [u8; TAG_LEN] {
        key_use::note(self.id, nonce, aad, buf);
        self.cipher
            .encrypt_in_place_detached(Nonce::from_slice(nonce), aad, buf)
            .expect("AES-GCM encryption cannot fail below 64 GiB")
            .into()
    }

    /// Authenticate and decrypt `buf` where it lies. On `false` the bytes
    /// are not authentic and `buf` is left as it was (still ciphertext).
    pub fn decrypt_in_place(
        &self,
        nonce: &[u8; NONCE_LEN],
        aad: &[u8],
        buf: &mut [u8],
        tag: &[u8; TAG_LEN],
    ) -> bool {
        self.cipher
            .decrypt_in_place_detached(Nonce::from_slice(nonce), aad, buf, tag.into())
            .is_ok()
    }

    /// Seal with a fresh random nonce, which is prepended to the output.
    pub fn encrypt_random(&self, aad: &[u8], msg: &[u8]) -> Vec<u8> {
        let nonce: [u8; NONCE_LEN] = rand::random();
        let mut out = nonce.to_vec();
        out.extend_from_slice(&self.encrypt_unrecorded(&nonce, aad, msg));
        out
    }

    pub fn decrypt_random(&self, aad: &[u8], data: &[u8]) -> Option<Vec<u8>> {
        if data.len() < NONCE_LEN + TAG_LEN {
            return None;
        }
        let (nonce, ct) = data.split_at(NONCE_LEN);
        self.decrypt(nonce.try_into().ok()?, aad, ct)
    }
}

/// The data key together with the volume id it belongs to: everything the
/// layers above need to derive their subkeys. Clones share the map of
/// epochs whose objects are keyed to their writer's claim token.
#[derive(Clone)]
pub struct VolumeKeys {
    pub volume_id: [u8; 16],
    key: DataKey,
    writers: Arc<RwLock<BTreeMap<u64, String>>>,
}

impl VolumeKeys {
    pub fn new(volume_id: [u8; 16], key: DataKey) -> Self {
        VolumeKeys {
            volume_id,
            key,
            writers: Arc::default(),
        }
    }

    pub fn subkey(&self, purpose: &str, object: &str) -> SubKey {
        SubKey::derive(&self.key, &self.volume_id, purpose, object)
    }

    /// Objects of `epoch` (segments, their tables, checkpoints) are keyed
    /// to the claim `token` of that epoch's writer.
    pub fn bind_epoch(&self, epoch: u64, token: &str) {
        self.writers.write().insert(epoch, token.to_string());
    }

    /// The token objects of `epoch` are keyed to, if they are bound.
    pub fn epoch_token(&self, epoch: u64) -> Option<String> {
        self.writers.read().get(&epoch).cloned()
    }

    /// The key of an object of `epoch` (a segment's frames or table, a
    /// checkpoint): bound to the epoch's writer when its claim was made by
    /// a format-3 writer, else the format-2 derivation.
    pub fn segment_key(&self, purpose: &str, epoch: u64, object: &str) -> SubKey {
        match self.writers.read().get(&epoch) {
            Some(token) => SubKey::derive_bound(&self.key, &self.volume_id, purpose, object, token),
            None => self.subkey(purpose, object),
        }
    }

    /// The data key, for re-wrapping under a new passphrase.
    pub fn data_key(&self) -> &DataKey {
        &self.key
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// docs/rfcs/0001, test 1: one object name, plaintext and nonce under
    /// two writers' tokens give different ciphertexts, and neither opens
    /// under the other's key (nor under the unbound, format-2 key).
    #[test]
    fn keys_bound_to_different_tokens_never_coincide() {
        let keys = VolumeKeys::new([7; 16], DataKey::random());
        let a = SubKey::derive_bound(&keys.key, &keys.volume_id, "segment-frames", "s", "aaaa");
        let b = SubKey::derive_bound(&keys.key, &keys.volume_id, "segment-frames", "s", "bbbb");
        let unbound = keys.subkey("segment-frames", "s");
        let nonce = counter_nonce(domain::FRAME, 0);
        let (ca, cb) = (
            a.encrypt(&nonce, b"aad", b"same"),
            b.encrypt(&nonce, b"aad", b"same"),
        );
        assert_ne!(ca, cb);
        assert!(b.decrypt(&nonce, b"aad", &ca).is_none());
        assert!(unbound.decrypt(&nonce, b"aad", &ca).is_none());
        assert_eq!(a.decrypt(&nonce, b"aad", &ca).unwrap(), b"same");
        // The binding follows the epoch.
        keys.bind_epoch(4, "aaaa");
        let bound = keys.segment_key("segment-frames", 4, "s");
        assert_eq!(bound.decrypt(&nonce, b"aad", &ca).unwrap(), b"same");
        let other_epoch = keys.segment_key("segment-frames", 5, "s");
        assert!(other_epoch.decrypt(&nonce, b"aad", &ca).is_none());
    }
}
