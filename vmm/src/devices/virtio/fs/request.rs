//! Checks on a guest request before fuse-backend-rs decodes it.
//!
//! fuse-backend-rs validates each message as it parses it, but sizes some host buffers from
//! guest fields (a READDIR or GETXATTR `size` becomes a `Vec` capacity) and trusts the
//! descriptor chain's total length. These checks keep every host allocation a request can
//! cause to about one maximal request, and answer nonsense with an error reply the guest can
//! match to its request (by `unique`), instead of leaving it to time out.

use std::mem::size_of;

use fuse_backend_rs::abi::fuse_abi::{GetxattrIn, InHeader, Opcode, ReadIn};
use fuse_backend_rs::transport::Reader;
use vm_memory::bitmap::BitmapSlice;

use super::defs::{MAX_IO_SIZE, MAX_REQUEST_SIZE, MAX_XATTR_SIZE};

/// What to do with one request.
#[derive(Debug, PartialEq, Eq)]
pub enum Verdict {
    /// Hand it to the FUSE server.
    Serve { unique: u64, opcode: u32 },
    /// Answer with this errno without serving it.
    Reject {
        unique: u64,
        opcode: u32,
        errno: i32,
        reason: &'static str,
    },
    /// Not even a FUSE header: return the buffer unanswered.
    Drop(&'static str),
}

/// Whether the driver waits for a reply to this opcode. FORGET and BATCH_FORGET never get
/// one; INTERRUPT gets none unless it is refused with EAGAIN, which we never do.
pub fn expects_reply(opcode: u32) -> bool {
    !(opcode == Opcode::Forget as u32
        || opcode == Opcode::BatchForget as u32
        || opcode == Opcode::Interrupt as u32)
}

/// Looks at the request in `reader` (left untouched: it works on a copy).
pub fn check<S: BitmapSlice>(reader: &Reader<'_, S>) -> Verdict {
    let mut r = reader.clone();
    let total = r.available_bytes();
    let Ok(hdr) = r.read_obj::<InHeader>() else {
        return Verdict::Drop("request shorter than a FUSE header");
    };
    let reject = |errno, reason| Verdict::Reject {
        unique: hdr.unique,
        opcode: hdr.opcode,
        errno,
        reason,
    };
    if total > MAX_REQUEST_SIZE {
        return reject(libc::E2BIG, "request larger than the largest FUSE request");
    }
    let len = hdr.len as usize;
    if len < size_of::<InHeader>() || len > total {
        return reject(
            libc::EINVAL,
            "header length does not match the request buffers",
        );
    }
    let op = hdr.opcode;
    if op == Opcode::Read as u32 || op == Opcode::Readdir as u32 || op == Opcode::Readdirplus as u32
    {
        match r.read_obj::<ReadIn>() {
            Ok(read) if read.size > MAX_IO_SIZE => {
                return reject(libc::EINVAL, "read size above the negotiated maximum")
            }
            Ok(_) => {}
            Err(_) => return reject(libc::EINVAL, "truncated read request"),
        }
    } else if op == Opcode::Getxattr as u32 || op == Opcode::Listxattr as u32 {
        match r.read_obj::<GetxattrIn>() {
            Ok(get) if get.size > MAX_XATTR_SIZE => {
                return reject(libc::E2BIG, "xattr size above XATTR_SIZE_MAX")
            }
            Ok(_) => {}
            Err(_) => return reject(libc::EINVAL, "truncated xattr request"),
        }
    }
    Verdict::Serve {
        unique: hdr.unique,
        opcode: hdr.opcode,
    }
}
