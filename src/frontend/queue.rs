//! One ublk hardware queue: a thread with its own io_uring and a local
//! executor running one task per tag. A tag task never blocks: it hands
//! the request to the volume on the engine's tokio runtime and awaits the
//! result, woken through the queue's eventfd (see `notify`).

use std::rc::Rc;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use io_uring::{opcode, types};
use libublk::helpers::IoBuf;
use libublk::io::{UblkDev, UblkQueue};
use libublk::{BufDesc, UblkError};

use super::notify::EventFd;
use super::{Counters, Shared};
use crate::error::Error;

/// Run `fut` on the engine runtime; resolve on the queue thread.
async fn offload<T: Send + 'static>(
    shared: &Shared,
    wake: &Arc<EventFd>,
    fut: impl Future<Output = Result<T, Error>> + Send + 'static,
) -> Result<T, Error> {
    let (tx, rx) = futures::channel::oneshot::channel();
    let wake = wake.clone();
    shared.runtime.spawn(async move {
        let _ = tx.send(fut.await);
        wake.notify();
    });
    rx.await
        .unwrap_or_else(|_| Err(Error::InvalidArgument("engine task was cancelled".into())))
}

fn errno(e: &Error, counters: &Counters) -> i32 {
    counters.errors.fetch_add(1, Ordering::Relaxed);
    tracing::warn!("request failed: {e}");
    -e.errno()
}

/// Serve one request; returns the ublk result (bytes done or -errno).
async fn serve(
    q: &UblkQueue<'_>,
    tag: u16,
    buf: &mut [u8],
    shared: &Shared,
    wake: &Arc<EventFd>,
) -> i32 {
    let iod = q.get_iod(tag);
    let op = iod.op_flags & 0xff;
    let fua = iod.op_flags & libublk::sys::UBLK_IO_F_FUA != 0;
    let offset = iod.start_sector << 9;
    let len = (iod.nr_sectors as usize) << 9;
    let c = &shared.counters;
    let vol = shared.volume.clone();
    match op {
        libublk::sys::UBLK_IO_OP_READ => {
            if len > buf.len() {
                return -libc::EINVAL;
            }
            c.reads.fetch_add(1, Ordering::Relaxed);
            // Hot path: all in memory, answered on this thread.
            match vol.try_read_cached(offset, &mut buf[..len]) {
                Ok(true) => {
                    c.bytes_read.fetch_add(len as u64, Ordering::Relaxed);
                    return len as i32;
                }
                Ok(false) => {}
                Err(e) => return errno(&e, c),
            }
            match offload(shared, wake, async move { vol.read(offset, len).await }).await {
                Ok(data) => {
                    buf[..len].copy_from_slice(&data);
                    c.bytes_read.fetch_add(len as u64, Ordering::Relaxed);
                    len as i32
                }
                Err(e) => errno(&e, c),
            }
        }
        libublk::sys::UBLK_IO_OP_WRITE => {
            if len > buf.len() {
                return -libc::EINVAL;
            }
            c.writes.fetch_add(1, Ordering::Relaxed);
            // Fast path: room under the dirty limit now, applied on this
            // thread (no write waits for the store).
            let r = match vol.try_write(offset, &buf[..len]) {
                Ok(true) if !fua => Ok(()),
                Ok(true) => offload(shared, wake, async move { vol.flush().await }).await,
                Ok(false) => {
                    let data = buf[..len].to_vec();
                    offload(shared, wake, async move {
                        vol.write(offset, &data).await?;
                        if fua {
                            vol.flush().await?;
                        }
                        Ok(())
                    })
                    .await
                }
                Err(e) => Err(e),
            };
            match r {
                Ok(()) => {
                    c.bytes_written.fetch_add(len as u64, Ordering::Relaxed);
                    len as i32
                }
                Err(e) => errno(&e, c),
            }
        }
        libublk::sys::UBLK_IO_OP_FLUSH => {
            c.flushes.fetch_add(1, Ordering::Relaxed);
            match offload(shared, wake, async move { vol.flush().await }).await {
                Ok(()) => 0,
                Err(e) => errno(&e, c),
            }
        }
        libublk::sys::UBLK_IO_OP_DISCARD | libublk::sys::UBLK_IO_OP_WRITE_ZEROES => {
            c.discards.fetch_add(1, Ordering::Relaxed);
            let discard = op == libublk::sys::UBLK_IO_OP_DISCARD;
            let r = offload(shared, wake, async move {
                if discard {
                    vol.discard(offset, len as u64).await
                } else {
                    vol.write_zeroes(offset, len as u64).await
                }
            })
            .await;
            match r {
                Ok(()) => 0,
                Err(e) => errno(&e, c),
            }
        }
        _ => -libc::EOPNOTSUPP,
    }
}

async fn tag_task(
    q: &UblkQueue<'_>,
    tag: u16,
    shared: &Shared,
    wake: &Arc<EventFd>,
) -> Result<(), UblkError> {
    let mut buf = IoBuf::<u8>::new(q.dev.dev_info.max_io_buf_bytes as usize);
    q.submit_io_prep_cmd(tag, BufDesc::Slice(buf.as_slice()), 0, Some(&buf))
        .await?;
    loop {
        let res = serve(q, tag, buf.as_mut_slice(), shared, wake).await;
        q.submit_io_commit_cmd(tag, BufDesc::Slice(buf.as_slice()), res)
            .await?;
    }
}

/// Keep a read of the eventfd pending in the ring, forever.
async fn wake_task(q: &UblkQueue<'_>, efd: &EventFd) {
    // Leaked on purpose: the kernel may still own the last read's buffer
    // when the ring is torn down.
    let counter: &'static mut u64 = Box::leak(Box::new(0u64));
    let ptr: *mut u8 = (counter as *mut u64).cast();
    loop {
        let sqe = opcode::Read::new(types::Fd(efd.raw()), ptr, 8).build();
        let res = q.ublk_submit_sqe(sqe).await;
        if res < 0 && res != -libc::EINTR && res != -libc::EAGAIN {
            tracing::error!("queue wakeup read failed: {res}");
            return;
        }
    }
}

/// The queue thread's body.
pub fn run(qid: u16, dev: &UblkDev, shared: Arc<Shared>) {
    let q = match UblkQueue::new(qid, dev) {
        Ok(q) => Rc::new(q),
        Err(e) => {
            tracing::error!("queue {qid}: cannot set up: {e}");
            return;
        }
    };
    let wake = match EventFd::new() {
        Ok(e) => Arc::new(e),
        Err(e) => {
            tracing::error!("queue {qid}: eventfd: {e}");
            return;
        }
    };
    let exe = Rc::new(smol::LocalExecutor::new());
    let mut tasks = Vec::new();
    for tag in 0..dev.dev_info.queue_depth {
        let (q, shared, wake) = (q.clone(), shared.clone(), wake.clone());
        tasks.push(exe.spawn(async move {
            match tag_task(&q, tag, &shared, &wake).await {
                Ok(()) | Err(UblkError::QueueIsDown) => {}
                Err(e) => tracing::error!("queue {qid} tag {tag}: {e}"),
            }
        }));
    }
    let waker = {
        let (q, wake) = (q.clone(), wake.clone());
        exe.spawn(async move { wake_task(&q, &wake).await })
    };
    let exe2 = exe.clone();
    let q2 = q.clone();
    smol::block_on(exe.run(async move {
        let run_ops = || while exe2.try_tick() {};
        let done = || tasks.iter().all(|t| t.is_finished());
        if let Err(e) = libublk::wait_and_handle_io_events(&q2, Some(20), run_ops, done).await {
            tracing::error!("queue {qid}: {e}");
        }
    }));
    drop(waker);
}
