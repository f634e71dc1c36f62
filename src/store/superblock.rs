//! The superblock: the one object readable without the key. It holds the
//! public parameters and the wrapped data key. The public parameters are the
//! AAD of the key wrap, so changing any of them makes the key unwrap fail;
//! a SHA-256 trailer tells accidental corruption apart from a wrong key.
//!
//! Object layout: `<JSON body>\nsha256:<hex of body>\n`.

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use super::keys::{Argon2Cost, DataKey, KdfParams, Secret, VolumeKeys, WrappedKey};
use crate::error::{Error, Result};

/// 3: objects of an epoch are keyed to its writer's claim token
/// (docs/rfcs/0001). 4: segments are made by conditional create and a new
/// owner fences its predecessor's next names (docs/rfcs/0003), so a
/// writer acknowledges a FLUSH without an ownership check — a format-3
/// build, which does not fence, must not take over such a volume. 5: a
/// checkpoint is a root naming index runs, a base and deltas
/// (docs/rfcs/0004), which a format-4 build cannot read. 6: segments and
/// checkpoints may hold patches (docs/rfcs/0007), which a format-5 build
/// would read as frames. 2 to 5 are still read (their whole-index
/// checkpoints too); a format-6 writer upgrades them.
pub const FORMAT_VERSION: u32 = 6;
/// The oldest format this build opens.
pub const OLDEST_FORMAT_VERSION: u32 = 2;
const MAGIC: &str = "zerofs-ublk volume";
pub const MIN_CHUNK_SIZE: u32 = 4096;
pub const MAX_CHUNK_SIZE: u32 = 16 << 20;
pub const DEFAULT_CHUNK_SIZE: u32 = 128 << 10;
pub const DEFAULT_ZSTD_LEVEL: i32 = 1;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CodecParams {
    pub compression: String,
    pub zstd_level: i32,
    pub cipher: String,
}

impl CodecParams {
    pub fn new(zstd_level: i32) -> Self {
        CodecParams {
            compression: "zstd".into(),
            zstd_level,
            cipher: "aes-256-gcm".into(),
        }
    }
}

/// Everything public about a volume. Serialized as the key-wrap AAD.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PublicParams {
    pub magic: String,
    pub format_version: u32,
    pub volume_id: String,
    pub size: u64,
    pub chunk_size: u32,
    pub codec: CodecParams,
    pub kdf: KdfParams,
    pub created_unix: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Superblock {
    #[serde(flatten)]
    pub params: PublicParams,
    pub wrapped_key: WrappedKey,
}

/// What `create` needs to know.
#[derive(Debug, Clone)]
pub struct CreateParams {
    pub size: u64,
    pub chunk_size: u32,
    pub zstd_level: i32,
    pub argon2: Argon2Cost,
}

impl CreateParams {
    pub fn new(size: u64) -> Self {
        CreateParams {
            size,
            chunk_size: DEFAULT_CHUNK_SIZE,
            zstd_level: DEFAULT_ZSTD_LEVEL,
            argon2: Argon2Cost::default(),
        }
    }

    pub fn validate(&self) -> Result<()> {
        let cs = self.chunk_size;
        if !cs.is_power_of_two() || !(MIN_CHUNK_SIZE..=MAX_CHUNK_SIZE).contains(&cs) {
            return Err(Error::InvalidArgument(format!(
                "chunk size {cs} must be a power of two between {MIN_CHUNK_SIZE} and {MAX_CHUNK_SIZE}"
            )));
        }
        if self.size == 0 || !self.size.is_multiple_of(cs as u64) {
            return Err(Error::InvalidArgument(format!(
                "size {} must be a non-zero multiple of the chunk size ({cs} bytes)",
                self.size
            )));
        }
        if !(1..=19).contains(&self.zstd_level) {
            return Err(Error::InvalidArgument(format!(
                "zstd level {} must be between 1 and 19",
                self.zstd_level
            )));
        }
        self.argon2
            .check()
            .map_err(|e| Error::InvalidArgument(e.to_string()))
    }
}

fn aad(params: &PublicParams) -> Vec<u8> {
    serde_json::to_vec(params).expect("params serialize")
}

impl Superblock {
    /// A new volume: fresh id and data key, wrapped under `secret`.
    pub fn new(create: &CreateParams, secret: &Secret) -> Result<(Self, VolumeKeys)> {
        create.validate()?;
        let volume_id: [u8; 16] = rand::random();
        let params = PublicParams {
            magic: MAGIC.into(),
            format_version: FORMAT_VERSION,
            volume_id: hex::encode(volume_id),
            size: create.size,
            chunk_size: create.chunk_size,
            codec: CodecParams::new(create.zstd_level),
            kdf: KdfParams::for_secret(secret, create.argon2),
            created_unix: crate::clock::unix_now(),
        };
        let key = DataKey::random();
        let kek = params.kdf.derive_kek(secret)?;
        let wrapped_key = WrappedKey::wrap(&kek, &key, &aad(&params));
        Ok((
            Superblock {
                params,
                wrapped_key,
            },
            VolumeKeys::new(volume_id, key),
        ))
    }

    pub fn unlock(&self, secret: &Secret) -> Result<VolumeKeys> {
        let kek = self.params.kdf.derive_kek(secret)?;
        let key = self.wrapped_key.unwrap(&kek, &aad(&self.params))?;
        Ok(VolumeKeys::new(self.volume_id()?, key))
    }

    /// This superblock at the current format version, its data key
    /// re-wrapped for the new parameters.
    pub fn upgraded(&self, secret: &Secret, keys: &VolumeKeys) -> Result<Superblock> {
        let mut params = self.params.clone();
        params.format_version = FORMAT_VERSION;
        // A fresh salt, hence a fresh KEK, as for every (re)wrap.
        let cost = match &params.kdf {
            KdfParams::Argon2id { cost, .. } => *cost,
            KdfParams::KeyFile { .. } => Argon2Cost::default(),
        };
        params.kdf = KdfParams::for_secret(secret, cost);
        let kek = params.kdf.derive_kek(secret)?;
        let wrapped_key = WrappedKey::wrap(&kek, keys.data_key(), &aad(&params));
        Ok(Superblock {
            params,
            wrapped_key,
        })
    }

    pub fn volume_id(&self) -> Result<[u8; 16]> {
        hex::decode(&self.params.volume_id)
            .ok()
            .and_then(|v| v.try_into().ok())
            .ok_or_else(|| Error::Format("superblock volume id is malformed".into()))
    }

    pub fn encode(&self) -> Vec<u8> {
        let mut body = serde_json::to_vec_pretty(self).expect("superblock serializes");
        let digest = hex::encode(Sha256::digest(&body));
        body.extend_from_slice(format!("\nsha256:{digest}\n").as_bytes());
        body
    }

    pub fn decode(bytes: &[u8]) -> Result<Self> {
        let corrupt = |why: &str| Error::Integrity(format!("superblock is corrupt: {why}"));
        let text = std::str::from_utf8(bytes).map_err(|_| corrupt("not UTF-8"))?;
        let (body, trailer) = text
            .rsplit_once("\nsha256:")
            .ok_or_else(|| corrupt("checksum line missing"))?;
        if hex::encode(Sha256::digest(body.as_bytes())) != trailer.trim_end() {
            return Err(corrupt("checksum mismatch"));
        }
        let sb: Superblock =
            serde_json::from_str(body).map_err(|e| corrupt(&format!("unparsable ({e})")))?;
        if sb.params.magic != MAGIC {
            return Err(Error::Format(
                "object is not a zerofs-ublk superblock".into(),
            ));
        }
        if !(OLDEST_FORMAT_VERSION..=FORMAT_VERSION).contains(&sb.params.format_version) {
            return Err(Error::Unsupported(format!(
                "volume format version {} is not supported by this build (supports {OLDEST_FORMAT_VERSION} to {FORMAT_VERSION})",
                sb.params.format_version
            )));
        }
        sb.volume_id()?;
        Ok(sb)
    }
}
