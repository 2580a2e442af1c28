//! The pod sandbox ("pause") container's process for CRI tests: it holds the
//! pod's namespaces open by doing nothing, reaps the children that end up
//! with it (as PID 1 of the pod's PID namespace), and exits on SIGTERM or
//! SIGINT.
//!
//! It uses only std plus a few libc calls declared here, so the CRI test
//! helper can build it with a bare `rustc -C target-feature=+crt-static`
//! into a static binary that runs in an image with nothing else in it.

use std::sync::atomic::{AtomicBool, Ordering};

const SIGINT: i32 = 2;
const SIGTERM: i32 = 15;
const SIGCHLD: i32 = 17;
const WNOHANG: i32 = 1;

extern "C" {
    fn signal(signum: i32, handler: extern "C" fn(i32)) -> usize;
    fn pause() -> i32;
    fn waitpid(pid: i32, status: *mut i32, options: i32) -> i32;
}

static STOP: AtomicBool = AtomicBool::new(false);

extern "C" fn on_stop(_: i32) {
    STOP.store(true, Ordering::SeqCst);
}

extern "C" fn on_child(_: i32) {
    // waitpid is async-signal-safe; reap everything that has exited.
    let mut status = 0;
    // SAFETY: a valid pointer to a local; -1 means any child.
    while unsafe { waitpid(-1, &mut status, WNOHANG) } > 0 {}
}

fn main() {
    // SAFETY: installing handlers that only touch an atomic or call waitpid.
    unsafe {
        signal(SIGTERM, on_stop);
        signal(SIGINT, on_stop);
        signal(SIGCHLD, on_child);
    }
    while !STOP.load(Ordering::SeqCst) {
        // SAFETY: pause has no preconditions; it returns after a signal.
        unsafe { pause() };
    }
}
