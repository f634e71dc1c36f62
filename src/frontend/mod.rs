//! The ublk frontend: `/dev/ublkbN` served from a volume.
//!
//! One thread and one io_uring per hardware queue (libublk); each tag is an
//! async task on the queue's local executor; the volume runs on the
//! engine's own tokio runtime and is reached without blocking a queue
//! thread (`queue::offload`). The device is created with
//! `UBLK_F_USER_RECOVERY | UBLK_F_USER_RECOVERY_REISSUE`: if this process
//! dies the device stays, and `recover` reattaches a new server which
//! re-issues the requests that were in flight.

mod notify;
mod queue;

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use libublk::UblkFlags;
use libublk::ctrl::{UblkCtrl, UblkCtrlBuilder};
use libublk::io::UblkDev;
use serde::Serialize;

use crate::error::{Error, Result};
use crate::volume::Volume;

pub const CONTROL_DEVICE: &str = "/dev/ublk-control";
/// Largest request the kernel sends us (and each tag's buffer size).
pub const MAX_IO_BYTES: u32 = 1 << 20;

/// Request counters, shared by all queues.
#[derive(Debug, Default, Serialize)]
pub struct Counters {
    pub reads: AtomicU64,
    pub writes: AtomicU64,
    pub flushes: AtomicU64,
    pub discards: AtomicU64,
    pub bytes_read: AtomicU64,
    pub bytes_written: AtomicU64,
    pub errors: AtomicU64,
}

/// What every queue thread shares.
pub struct Shared {
    pub volume: Arc<Volume>,
    pub runtime: tokio::runtime::Handle,
    pub counters: Counters,
}

#[derive(Debug, Clone)]
pub struct DeviceOptions {
    /// Device id to create (-1: the kernel picks), or to recover.
    pub id: i32,
    pub queues: u16,
    pub depth: u16,
    /// 512 or 4096.
    pub logical_block: u32,
    /// Reattach to an existing device whose server died.
    pub recover: bool,
    /// Stored with the device (libublk's json), for `list`.
    pub target_json: serde_json::Value,
}

/// A running device, as reported when it is ready.
#[derive(Debug, Clone, Serialize)]
pub struct DeviceInfo {
    pub id: u32,
    pub block_device: String,
}

pub fn check_driver() -> Result<()> {
    if !Path::new(CONTROL_DEVICE).exists() {
        return Err(Error::Unsupported(format!(
            "ublk_drv is not loaded ({CONTROL_DEVICE} is missing; run: modprobe ublk_drv)"
        )));
    }
    Ok(())
}

fn ublk_error(what: &str, e: libublk::UblkError) -> Error {
    Error::Unsupported(format!("ublk {what} failed: {e}"))
}

/// Device parameters: see ARCHITECTURE.md, "Frontend".
fn set_params(dev: &mut UblkDev, size: u64, chunk_size: u32, logical_block: u32) {
    use libublk::sys;
    dev.set_default_params(size);
    let p = &mut dev.tgt.params;
    p.types |= sys::UBLK_PARAM_TYPE_DISCARD;
    p.basic.attrs = sys::UBLK_ATTR_VOLATILE_CACHE | sys::UBLK_ATTR_FUA;
    p.basic.logical_bs_shift = logical_block.trailing_zeros() as u8;
    p.basic.physical_bs_shift = 12;
    p.basic.io_min_shift = 12;
    p.basic.io_opt_shift = chunk_size.trailing_zeros() as u8;
    p.discard.discard_granularity = chunk_size;
    p.discard.discard_alignment = 0;
    p.discard.max_discard_sectors = 1 << 21; // 1 GiB per request
    p.discard.max_write_zeroes_sectors = 1 << 21;
    p.discard.max_discard_segments = 1;
}

/// Serve `volume` as a ublk device until the device is stopped (by
/// `stop(id)`, `del`, or the kernel). Blocks the calling thread, which
/// must not be a tokio worker. `ready` is called once the device is live.
pub fn serve(
    shared: Arc<Shared>,
    opts: &DeviceOptions,
    ready: impl FnOnce(DeviceInfo) + Send + Sync + 'static,
) -> Result<()> {
    let volume = shared.volume.clone();
    check_driver()?;
    if ![512, 4096].contains(&opts.logical_block) {
        return Err(Error::InvalidArgument(
            "logical block size must be 512 or 4096".into(),
        ));
    }
    let flags =
        (libublk::sys::UBLK_F_USER_RECOVERY | libublk::sys::UBLK_F_USER_RECOVERY_REISSUE) as u64;
    let dev_flags = if opts.recover {
        let old = UblkCtrl::new_simple(opts.id).map_err(|e| ublk_error("open device", e))?;
        old.start_user_recover()
            .map_err(|e| ublk_error("start user recovery", e))?;
        UblkFlags::UBLK_DEV_F_RECOVER_DEV
    } else {
        UblkFlags::UBLK_DEV_F_ADD_DEV
    };
    let ctrl = UblkCtrlBuilder::default()
        .name("zerofs-ublk")
        .id(opts.id)
        .nr_queues(opts.queues)
        .depth(opts.depth)
        .io_buf_bytes(MAX_IO_BYTES)
        .ctrl_flags(flags)
        .dev_flags(dev_flags)
        .build()
        .map_err(|e| ublk_error("create device", e))?;
    let (size, chunk, lbs) = (volume.size(), volume.chunk_size(), opts.logical_block);
    let json = opts.target_json.clone();
    let tgt_init = move |dev: &mut UblkDev| {
        set_params(dev, size, chunk, lbs);
        dev.set_target_json(json);
        Ok(())
    };
    let q_shared = shared.clone();
    let q_fn = move |qid: u16, dev: &UblkDev| queue::run(qid, dev, q_shared.clone());
    let on_ready = move |ctrl: &UblkCtrl| {
        ready(DeviceInfo {
            id: ctrl.dev_info().dev_id,
            block_device: ctrl.get_bdev_path(),
        })
    };
    ctrl.run_target(tgt_init, q_fn, on_ready)
        .map_err(|e| ublk_error("serve device", e))?;
    Ok(())
}

/// Stop a device: its queues drain and `serve` returns.
pub fn stop(id: u32) -> Result<()> {
    let ctrl = UblkCtrl::new_simple(id as i32).map_err(|e| ublk_error("open device", e))?;
    ctrl.kill_dev().map_err(|e| ublk_error("stop device", e))?;
    Ok(())
}

/// Delete a device whose server is gone.
pub fn delete(id: u32) -> Result<()> {
    let ctrl = UblkCtrl::new_simple(id as i32).map_err(|e| ublk_error("open device", e))?;
    ctrl.del_dev().map_err(|e| ublk_error("delete device", e))?;
    Ok(())
}

/// The kernel's view of a device: its state name.
pub fn device_state(id: u32) -> Option<String> {
    let ctrl = UblkCtrl::new_simple(id as i32).ok()?;
    let state = ctrl.dev_info().state as u32;
    Some(
        match state {
            libublk::sys::UBLK_S_DEV_DEAD => "dead",
            libublk::sys::UBLK_S_DEV_LIVE => "live",
            libublk::sys::UBLK_S_DEV_QUIESCED => "quiesced",
            libublk::sys::UBLK_S_DEV_FAIL_IO => "fail-io",
            _ => "unknown",
        }
        .to_string(),
    )
}

impl Counters {
    pub fn snapshot(&self) -> serde_json::Value {
        let g = |a: &AtomicU64| a.load(Ordering::Relaxed);
        serde_json::json!({
            "reads": g(&self.reads),
            "writes": g(&self.writes),
            "flushes": g(&self.flushes),
            "discards": g(&self.discards),
            "bytes_read": g(&self.bytes_read),
            "bytes_written": g(&self.bytes_written),
            "errors": g(&self.errors),
        })
    }
}
