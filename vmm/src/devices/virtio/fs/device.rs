//! The transport-independent part of the virtio-fs device: serving FUSE requests from the
//! guest's virtqueues with fuse-backend-rs's passthrough file system.
//!
//! A front end (vhost-user today, husk-vmm's own virtio-mmio transport later) owns the queues
//! and the event loop, and calls [`FsDevice::process_queue`] for a queue the guest kicked; it
//! returns whether the guest must be interrupted for that queue. Queue 0 is the high-priority
//! queue, queues 1..=N the request queues; all are served the same way. Processing takes
//! `&self`, so a front end may serve different queues from different threads.

use std::mem::size_of;
use std::sync::Arc;
use std::time::Duration;

use fuse_backend_rs::abi::fuse_abi::OutHeader;
use fuse_backend_rs::api::filesystem::FileSystem;
use fuse_backend_rs::api::server::Server;
use fuse_backend_rs::passthrough::{CachePolicy, Config, PassthroughFs};
use fuse_backend_rs::transport::{Reader, VirtioFsWriter, Writer};
use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::virtio_ring::{VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC};
use virtio_queue::{DescriptorChain, Queue, QueueT};
use vm_memory::bitmap::BitmapSlice;
use vm_memory::GuestMemory;

use super::defs::{FS_CONFIG_SIZE, TAG_LEN};
use super::request::{self, Verdict};
use super::share::SharedFs;
use super::{CacheMode, FsConfig, FsError};
use crate::devices::virtio::device::read_config_space;

/// How many times one `process_queue` call re-checks a queue that got new buffers while it
/// was being drained. Bounded so that a driver whose ring claims buffers it never yields (a
/// broken or hostile avail index) cannot keep the device thread spinning.
const MAX_ROUNDS: usize = 8;

type Fs = Arc<SharedFs>;

/// The virtio-fs device model: one shared directory, one tag.
pub struct FsDevice {
    tag: String,
    num_request_queues: u16,
    fs: Fs,
    server: Server<Fs>,
    /// Set by [`FsDevice::reset_later`], done by the next [`FsDevice::process_queue`].
    reset_pending: std::sync::atomic::AtomicBool,
}

impl FsDevice {
    /// Checks `cfg` and opens the shared directory. Clears the process umask (see the
    /// module docs).
    pub fn new(cfg: FsConfig) -> Result<Self, FsError> {
        let dir = cfg.validate()?;
        let root_dir = dir
            .to_str()
            .ok_or_else(|| FsError::NonUtf8Path(dir.clone()))?
            .to_string();
        let (cache_policy, timeout) = match cfg.cache {
            CacheMode::Never => (CachePolicy::Never, Duration::ZERO),
            CacheMode::Auto => (CachePolicy::Auto, Duration::from_secs(1)),
            CacheMode::Always => (CachePolicy::Always, Duration::from_secs(86400)),
        };
        let fs_cfg = Config {
            root_dir,
            cache_policy,
            attr_timeout: timeout,
            entry_timeout: timeout,
            xattr: cfg.xattr,
            writeback: false,
            // `do_import` also turns on fuse-backend-rs's check of name components (no `/`,
            // `.`, `..` in names given to create, mkdir, rename, ...): it must stay on.
            do_import: true,
            // O_PATH fds rather than file handles: file handles would let a request name
            // any inode of the host file system by handle.
            inode_file_handles: false,
            ..Config::default()
        };
        let fs = PassthroughFs::<()>::new(fs_cfg).map_err(FsError::Passthrough)?;
        // Open the root now, so that a directory that cannot be opened is an error at start-up
        // rather than at the guest's FUSE_INIT (which imports it again).
        fs.import().map_err(|source| FsError::SharedDir {
            path: cfg.shared_dir.clone(),
            source,
        })?;
        let fs = Arc::new(SharedFs(fs));
        Ok(FsDevice {
            tag: cfg.tag,
            num_request_queues: cfg.num_request_queues,
            server: Server::new(Arc::clone(&fs)),
            fs,
            reset_pending: std::sync::atomic::AtomicBool::new(false),
        })
    }

    pub fn tag(&self) -> &str {
        &self.tag
    }

    /// The high-priority queue plus the request queues.
    pub fn num_queues(&self) -> usize {
        1 + usize::from(self.num_request_queues)
    }

    /// Virtio feature bits the device offers (transport-specific bits are the front end's).
    /// Indirect descriptors let Linux queue a 1 MiB request in one ring slot.
    pub fn device_features() -> u64 {
        (1u64 << VIRTIO_F_VERSION_1)
            | (1u64 << VIRTIO_RING_F_EVENT_IDX)
            | (1u64 << VIRTIO_RING_F_INDIRECT_DESC)
    }

    /// `struct virtio_fs_config`: the tag, NUL padded, then `num_request_queues` (le32).
    pub fn config_space(&self) -> [u8; FS_CONFIG_SIZE] {
        let mut config = [0u8; FS_CONFIG_SIZE];
        let tag = self.tag.as_bytes();
        let n = tag.len().min(TAG_LEN);
        config[..n].copy_from_slice(&tag[..n]);
        config[TAG_LEN..].copy_from_slice(&u32::from(self.num_request_queues).to_le_bytes());
        config
    }

    /// Reads `data.len()` bytes of config space at `offset`; bytes beyond the config read as 0.
    pub fn read_config(&self, offset: u64, data: &mut [u8]) {
        read_config_space(&self.config_space(), offset, data);
    }

    /// The driver reset the device: forget every inode and close every file the guest had
    /// open, as FUSE_DESTROY does.
    pub fn reset(&self) {
        self.reset_pending
            .store(false, std::sync::atomic::Ordering::Relaxed);
        self.fs.destroy();
    }

    /// [`FsDevice::reset`], done on the thread that next serves a queue. husk-vmm's virtio-mmio
    /// transport sees the driver's reset on a vCPU thread, whose seccomp filter has no file
    /// system calls, and forgetting the inodes re-opens the shared directory's root.
    pub fn reset_later(&self) {
        self.reset_pending
            .store(true, std::sync::atomic::Ordering::Relaxed);
    }

    /// Serves every request the guest put in `queue`. Returns whether the guest needs an
    /// interrupt for it. One bad request is answered (or dropped) and the rest are served.
    pub fn process_queue<M: GuestMemory>(
        &self,
        mem: &M,
        queue: &mut Queue,
    ) -> Result<bool, FsError> {
        if self
            .reset_pending
            .swap(false, std::sync::atomic::Ordering::Relaxed)
        {
            self.fs.destroy();
        }
        if !queue.ready() {
            return Ok(false);
        }
        let mut used = false;
        for _ in 0..MAX_ROUNDS {
            queue.disable_notification(mem)?;
            while let Some(chain) = queue.pop_descriptor_chain(mem) {
                let head = chain.head_index();
                let len = self.serve(mem, chain);
                queue.add_used(mem, head, len)?;
                used = true;
            }
            // With EVENT_IDX the driver may add buffers between our last pop and re-enabling
            // notifications; enable_notification tells us so.
            if !queue.enable_notification(mem)? {
                break;
            }
        }
        if used {
            Ok(queue.needs_notification(mem)?)
        } else {
            Ok(false)
        }
    }

    /// Serves one request; returns the bytes written into the chain (the used length).
    fn serve<M: GuestMemory>(&self, mem: &M, chain: DescriptorChain<&M>) -> u32 {
        let reader = match Reader::from_descriptor_chain(mem, chain.clone()) {
            Ok(r) => r,
            Err(e) => {
                husk_bounds::ratelimited!(warn, error = %e, "virtio-fs: request buffers outside guest memory; dropping it");
                return 0;
            }
        };
        let writer = match VirtioFsWriter::new(mem, chain) {
            Ok(w) => w,
            Err(e) => {
                husk_bounds::ratelimited!(warn, error = %e, "virtio-fs: reply buffers outside guest memory; dropping request");
                return 0;
            }
        };
        let capacity = writer.available_bytes();
        match request::check(&reader) {
            Verdict::Drop(reason) => {
                husk_bounds::ratelimited!(warn, reason, "virtio-fs: dropping malformed request");
                0
            }
            Verdict::Reject {
                unique,
                opcode,
                errno,
                reason,
            } => {
                husk_bounds::ratelimited!(warn, opcode, reason, "virtio-fs: refusing request");
                if request::expects_reply(opcode) {
                    reply_error(writer, unique, errno)
                } else {
                    0
                }
            }
            Verdict::Serve { unique, opcode } => {
                match self.server.handle_message(
                    reader,
                    Writer::VirtioFs(writer.clone()),
                    None,
                    None,
                ) {
                    // The server reports what it wrote; it cannot exceed the buffers, but the
                    // used length must never claim more than the driver gave us.
                    Ok(n) => u32::try_from(n.min(capacity)).unwrap_or(u32::MAX),
                    Err(e) => {
                        // Decoding failed part-way (a truncated body, a name without NUL, ...).
                        // Some of those paths already wrote an error reply, others nothing:
                        // (re)write one at the start of the reply buffers either way.
                        husk_bounds::ratelimited!(debug, opcode, error = %e, "virtio-fs: malformed request");
                        if request::expects_reply(opcode) {
                            reply_error(writer, unique, libc::EINVAL)
                        } else {
                            0
                        }
                    }
                }
            }
        }
    }
}

/// Writes a bare FUSE error reply; returns its length, or 0 if the chain has no room for it.
fn reply_error<S: BitmapSlice>(mut w: VirtioFsWriter<'_, S>, unique: u64, errno: i32) -> u32 {
    let out = OutHeader {
        len: size_of::<OutHeader>() as u32,
        error: -errno,
        unique,
    };
    match w.write_obj(out) {
        Ok(()) => out.len,
        Err(e) => {
            husk_bounds::ratelimited!(warn, error = %e, "virtio-fs: no room for an error reply; dropping request");
            0
        }
    }
}
