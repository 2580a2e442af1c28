//! Reading a packet header straight from guest memory.
//!
//! `virtio_vsock::packet::VsockPacket` is the parser for every well-formed packet. This is the
//! fallback for chains it rejects (for example a `len` larger than the chain): if the header
//! itself is readable we still learn which connection the broken packet belonged to, so that
//! connection can be reset instead of silently losing data.

use std::ops::Deref;

use virtio_queue::DescriptorChain;
use vm_memory::{Bytes, GuestMemory};

use super::defs::VSOCK_PKT_HDR_SIZE;

/// The fields of `struct virtio_vsock_hdr`, decoded from little endian.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PktHeader {
    pub src_cid: u64,
    pub dst_cid: u64,
    pub src_port: u32,
    pub dst_port: u32,
    pub len: u32,
    pub type_: u16,
    pub op: u16,
    pub flags: u32,
    pub buf_alloc: u32,
    pub fwd_cnt: u32,
}

impl PktHeader {
    pub fn from_bytes(b: &[u8; VSOCK_PKT_HDR_SIZE]) -> Self {
        let u64_at = |o: usize| {
            let mut v = [0u8; 8];
            v.copy_from_slice(&b[o..o + 8]);
            u64::from_le_bytes(v)
        };
        let u32_at = |o: usize| {
            let mut v = [0u8; 4];
            v.copy_from_slice(&b[o..o + 4]);
            u32::from_le_bytes(v)
        };
        let u16_at = |o: usize| u16::from_le_bytes([b[o], b[o + 1]]);
        PktHeader {
            src_cid: u64_at(0),
            dst_cid: u64_at(8),
            src_port: u32_at(16),
            dst_port: u32_at(20),
            len: u32_at(24),
            type_: u16_at(28),
            op: u16_at(30),
            flags: u32_at(32),
            buf_alloc: u32_at(36),
            fwd_cnt: u32_at(40),
        }
    }

    pub fn to_bytes(&self) -> [u8; VSOCK_PKT_HDR_SIZE] {
        let mut b = [0u8; VSOCK_PKT_HDR_SIZE];
        b[0..8].copy_from_slice(&self.src_cid.to_le_bytes());
        b[8..16].copy_from_slice(&self.dst_cid.to_le_bytes());
        b[16..20].copy_from_slice(&self.src_port.to_le_bytes());
        b[20..24].copy_from_slice(&self.dst_port.to_le_bytes());
        b[24..28].copy_from_slice(&self.len.to_le_bytes());
        b[28..30].copy_from_slice(&self.type_.to_le_bytes());
        b[30..32].copy_from_slice(&self.op.to_le_bytes());
        b[32..36].copy_from_slice(&self.flags.to_le_bytes());
        b[36..40].copy_from_slice(&self.buf_alloc.to_le_bytes());
        b[40..44].copy_from_slice(&self.fwd_cnt.to_le_bytes());
        b
    }
}

/// Reads the header of a TX chain's head descriptor, if it is device-readable and big enough.
pub fn peek_tx_header<M, T>(mem: &M, mut chain: DescriptorChain<T>) -> Option<PktHeader>
where
    M: GuestMemory,
    T: Deref,
    T::Target: GuestMemory,
{
    let head = chain.next()?;
    if head.is_write_only() || (head.len() as usize) < VSOCK_PKT_HDR_SIZE {
        return None;
    }
    let mut raw = [0u8; VSOCK_PKT_HDR_SIZE];
    mem.read_slice(&mut raw, head.addr()).ok()?;
    Some(PktHeader::from_bytes(&raw))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_round_trip() {
        let h = PktHeader {
            src_cid: 3,
            dst_cid: 2,
            src_port: 0x1234_5678,
            dst_port: 1024,
            len: 77,
            type_: 1,
            op: 5,
            flags: 3,
            buf_alloc: 65536,
            fwd_cnt: 0xdead_beef,
        };
        assert_eq!(PktHeader::from_bytes(&h.to_bytes()), h);
    }
}
