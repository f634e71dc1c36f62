//! The log store: everything the volume keeps in object storage.
//!
//! - `backend`: object storage (memory, local directory, S3 via opendal);
//! - `keys`: data key, key wrapping, per-purpose subkeys;
//! - `superblock`: the public volume parameters and wrapped key;
//! - `segment`, `index`, `checkpoint`: the log of chunk frames and its map;
//! - `fencing`: the single-writer protocol — claims, seals, releases, and
//!   the `Fence` that makes and checks them;
//! - `paths`: every object name and its parsing;
//! - `append`: our segment ids, and the window rule that lets a new
//!   owner fence us without a request on the FLUSH path;
//! - `log`: open / recover / append, tying the above together.
//!
//! This layer never sees plaintext chunk data: frames arrive encrypted
//! from the codec above it.

pub mod append;
pub mod backend;
pub mod checkpoint;
pub mod fencing;
pub mod index;
pub mod keys;
pub mod log;
pub mod paths;
pub mod segment;
pub mod superblock;
pub(crate) mod wire;

pub use index::{Index, Loc, Mapping};
pub use log::{Inventory, LogStore, LogSummary, OpenMode, WriterOptions};
pub use segment::SegmentId;
pub use superblock::{CreateParams, Superblock};
