//! zerofs-ublk: a Linux block device whose bytes live in object storage.
//!
//! Layers, top to bottom (a layer never imports one above it):
//! `cli` → `volume` (block semantics, dirty table) → `cache` → `codec`
//! (zstd + AES-256-GCM frames) → `store` (segments, index, checkpoints,
//! fencing) → object storage. `clock` and `error` sit below them all.
//! See docs/ARCHITECTURE.md.

pub mod cache;
pub mod cli;
pub mod clock;
pub mod codec;
pub mod error;
pub mod frontend;
pub mod store;
pub mod volume;

pub use error::{Error, Result};
