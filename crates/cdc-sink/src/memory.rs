//! The process's allocator settings.

/// Caps glibc's malloc arenas at two, unless `MALLOC_ARENA_MAX` or
/// `GLIBC_TUNABLES` sets them.
///
/// glibc gives a thread that meets contention an arena of its own, up to
/// eight per core, and keeps memory freed in an arena there for that arena
/// to reuse. The blocking threads that read, merge and rewrite
/// current-state tables' files each end up holding tens of MiB freed long
/// before. With two arenas the drain with current-state tables peaked at
/// 450–480 MiB instead of 763–840 (syncs of 4 MiB; 415–432 instead of
/// 601–697 at 2 MiB), at about the same CPU per row; with the changelog
/// alone it saved little (200–207 MiB against 220–244) and cost about 9%
/// more CPU per row (threads wait for the two arenas), so `main` calls
/// this only where current-state tables are written (docs/benchmarks.md,
/// "2026-12-07 (night)").
///
/// Call it before any other thread exists: an arena already made is kept.
pub fn limit_malloc_arenas() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    if std::env::var_os("MALLOC_ARENA_MAX").is_none()
        && !std::env::var("GLIBC_TUNABLES").is_ok_and(|t| t.contains("arena_max"))
    {
        // SAFETY: mallopt sets one of the allocator's parameters; it is
        // called before the process has another thread.
        unsafe {
            libc::mallopt(libc::M_ARENA_MAX, 2);
        }
    }
}
