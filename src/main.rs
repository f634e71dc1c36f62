/// jemalloc, not glibc malloc: the engine churns through chunk-sized
/// buffers on many threads (writers, flush encoders, readers, cache
/// eviction), and glibc's per-thread arenas kept freed buffers resident —
/// 1.6 GiB RSS where 0.3 GiB was live (BENCHMARKS.md, P5). See
/// docs/ARCHITECTURE.md, "Decisions".
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

/// jemalloc's build-time configuration (`malloc_conf`, prefixed as this
/// build of jemalloc is): a background thread returns freed pages to the
/// kernel after a second, so RSS follows live memory instead of the peak.
#[allow(non_upper_case_globals)]
#[unsafe(export_name = "_rjem_malloc_conf")]
pub static malloc_conf: &[u8; 60] =
    b"background_thread:true,dirty_decay_ms:1000,muzzy_decay_ms:0\0";

fn main() -> std::process::ExitCode {
    zerofs_ublk::cli::main()
}
