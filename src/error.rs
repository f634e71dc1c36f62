//! The engine's error type. Every variant's message is one line a user can
//! act on; the CLI prints it as is.

use crate::store::backend::StoreError;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Store(#[from] StoreError),
    /// Authentication or checksum failure: the bytes in the bucket are not
    /// what this volume wrote. Never turned into data.
    #[error("integrity error: {0}")]
    Integrity(String),
    #[error("wrong passphrase or key file for this volume (the data key could not be unwrapped)")]
    WrongKey,
    #[error("no volume at {0} (create one with `zerofs-ublk create`)")]
    NoVolume(String),
    #[error("a volume already exists at {0}")]
    VolumeExists(String),
    #[error("volume is in use by {0}; if that writer is gone, pass --force to take over")]
    InUse(String),
    #[error(
        "this writer was fenced: epoch {0} was claimed by another writer; nothing more is acknowledged"
    )]
    Fenced(u64),
    #[error("{0}")]
    InvalidArgument(String),
    #[error("{0}")]
    Unsupported(String),
    #[error("{0}")]
    Format(String),
    /// A FLUSH made everything durable but these writes: each went into a
    /// part of a chunk whose stored version cannot be read for good
    /// (volume::partial), so the chunk cannot be completed; they are
    /// dropped, as a disk drops writes it fails to store.
    #[error("acknowledged writes were dropped, the rest is durable: {0}")]
    WritesDropped(String),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    /// The errno a block device request failing with this error reports.
    pub fn errno(&self) -> i32 {
        match self {
            Error::InvalidArgument(_) => libc::EINVAL,
            Error::Unsupported(_) => libc::EOPNOTSUPP,
            Error::Fenced(_) => libc::EROFS,
            _ => libc::EIO,
        }
    }
}
