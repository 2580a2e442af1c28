#!/usr/bin/env python3
"""Writes the seed corpora fuzz/corpus/<target>/ : a few valid inputs per target, in the byte
encodings the targets decode (see each fuzz_targets/<target>.rs). Re-run after changing an
encoding: `python3 fuzz/gen_corpus.py`."""

import os
import struct

HERE = os.path.dirname(os.path.abspath(__file__))


def u16(v):
    return struct.pack("<H", v)


def u32(v):
    return struct.pack("<I", v)


def u64(v):
    return struct.pack("<Q", v)


def blob(b):
    return u16(len(b)) + b


def write(target, name, data):
    d = os.path.join(HERE, "corpus", target)
    os.makedirs(d, exist_ok=True)
    with open(os.path.join(d, name), "wb") as f:
        f.write(data)


# ---------------------------------------------------------------- vsock_tx
# ports: 0=1024 1=5000 2=1<<30 3=(1<<30)+1 4=52 5=7777 6=u32::MAX 7=raw
OP_REQ, OP_RESP, OP_RST, OP_SHUT, OP_RW, OP_CUPD, OP_CREQ = 1, 2, 3, 4, 5, 6, 7


def vpkt(op, src, dst, payload=b"", layout=0, flags_sel=0, mode=0, extra=b""):
    # send_packet: blob, header(mode, op, src, dst, [len], flags, [credit]), layout
    return bytes([0]) + blob(payload) + bytes([mode, op, src, dst]) + extra + bytes([flags_sel, layout])


RX = bytes([4, 7, 0])  # provide 8 RX buffers (44 + 4096)
RUN = bytes([5])


def host(op, *args):
    return bytes([7, op]) + bytes(args)


def host_write(i, data):
    return bytes([7, 2, i]) + blob(data)


guest_conn = (bytes([0x03]) + RX + vpkt(OP_REQ, 4, 0) + RUN + host(0)
              + vpkt(OP_RW, 4, 0, b"hello host") + RUN + host(4, 0)
              + host_write(0, b"hello guest") + RUN + RX + RUN
              + vpkt(OP_CREQ, 4, 0) + RUN
              + vpkt(OP_SHUT, 4, 0, flags_sel=2) + RUN + vpkt(OP_RST, 4, 0) + RUN)
write("vsock_tx", "guest_connect", guest_conn)

host_conn = (bytes([0x03]) + RX + host(1, 2) + RUN + RUN
             + bytes([8, 0, 0])  # RESPONSE from guest port 1024 to local port 1<<30
             + RUN + host_write(0, b"ping") + RUN + RX + RUN
             + vpkt(OP_RW, 0, 2, b"pong", layout=2 | 1) + RUN
             + vpkt(OP_CUPD, 0, 2) + RUN + host(5, 0) + RUN + host(7, 0) + RUN)
write("vsock_tx", "host_connect", host_conn)

small_credit = (bytes([0x05 | 0x20]) + RX + vpkt(OP_REQ, 4, 1) + RUN + host(0)
                + vpkt(OP_RW, 4, 1, b"x" * 100, layout=4) + RUN
                + vpkt(OP_RW, 4, 1, b"y" * 3000) + RUN + host(4, 0) + RUN
                + host_write(0, b"z" * 5000) + RX + RUN + RX + RUN)
write("vsock_tx", "small_credit", small_credit)

malformed = (bytes([0x13]) + RX
             + vpkt(OP_RW, 4, 7, b"abc", mode=1, extra=u32(100000))  # len beyond chain
             + vpkt(OP_REQ, 4, 5) + vpkt(0, 4, 0)                      # refused, invalid op
             + bytes([0]) + blob(b"") + bytes([0xf0]) + u64(9) + u64(2) + u16(1)
             + bytes([OP_REQ, 4, 0, 0, 0])                             # wrong CID
             + vpkt(OP_REQ, 4, 0, layout=0x40, extra=b"") + bytes([20])  # short header
             + RUN + bytes([9, 0]) + RX + RUN)
write("vsock_tx", "malformed", malformed)

# ---------------------------------------------------------------- vsock_handshake
write("vsock_handshake", "connect", b"\x00CONNECT 1024\n")
write("vsock_handshake", "connect_payload", b"\x03CONNECT 52\r\nhello, guest: this is the first payload")
write("vsock_handshake", "split", b"\x07CONNECT 4294967295\n" + bytes(range(32, 127)))
write("vsock_handshake", "bad_port", b"\x01CONNECT 4294967296\n")
write("vsock_handshake", "overlong", b"\x02" + b"CONNECT " + b"1" * 70 + b"\n")
write("vsock_handshake", "http", b"\x01GET / HTTP/1.1\r\nHost: x\r\n\r\n")

# ---------------------------------------------------------------- fs_request
OPS = [26, 1, 2, 3, 4, 5, 6, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 20, 21, 22, 23, 24, 25,
       27, 28, 29, 30, 31, 32, 33, 34, 35, 36, 37, 38, 39, 40, 41, 42, 44, 45, 46, 47]


def ino(n):
    return 0 if n == 1 else n + 98  # nodeid selector byte


def freq(opcode, nodeid, body, hiprio=False, reply_sel=0):
    # request: sel, nodeid, flags=0, blob(body), reply cap sel, queue, indirect (1 = no)
    return bytes([0, OPS.index(opcode), ino(nodeid), 0]) + blob(body) + bytes([reply_sel, 0 if hiprio else 1, 1])


PROC = bytes([6])
# FUSE_INIT 7.31: ASYNC_READ | BIG_WRITES | DO_READDIRPLUS
init = bytes([0, 0, 0, 0]) + blob(u32(7) + u32(31) + u32(128 << 10) + u32(0x1 | 0x8 | 0x80000)) + bytes([0, 1, 1])


def cstr(s):
    return s + b"\0"


read_in = lambda fh, off, size: u64(fh) + u64(off) + u32(size) + u32(0) + u64(0) + u32(0) + u32(0)
write_in = lambda fh, off, data: u64(fh) + u64(off) + u32(len(data)) + u32(0) + u64(0) + u32(0) + u32(0) + data

read_file = (bytes([0]) + init + freq(1, 1, cstr(b"file")) + freq(14, 2, u32(0) + u32(0))
             + freq(15, 2, read_in(1, 0, 4096)) + freq(3, 2, u32(0) + u32(0) + u64(0))
             + freq(18, 2, u64(1) + u32(0) + u32(0) + u64(0)) + PROC
             + freq(2, 2, u64(1), hiprio=True) + PROC)
write("fs_request", "read_file", read_file)

O_RDWR, O_CREAT = 2, 0o100
create = (bytes([0]) + init
          + freq(35, 1, u32(O_RDWR | O_CREAT) + u32(0o100644) + u32(0o22) + u32(0) + cstr(b"new"))
          + freq(16, 2, write_in(1, 0, b"written by the guest\n"))
          + freq(18, 2, u64(1) + u32(0) + u32(0) + u64(0))
          + freq(9, 1, u32(0o755) + u32(0) + cstr(b"d"))
          + freq(12, 1, u64(1) + cstr(b"new") + cstr(b"moved"))
          + freq(6, 1, cstr(b"sl") + cstr(b"../../etc/passwd"))
          + freq(10, 1, cstr(b"moved")) + freq(11, 1, cstr(b"d")) + PROC)
write("fs_request", "create_write", create)

setattr_in = (u32(1 | 8) + u32(0) + u64(0) + u64(100) + u64(0) + u64(0) + u64(0) + u64(0)
              + u32(0) * 3 + u32(0o600) + u32(0) + u32(0) + u32(0) + u32(0))
dirs = (bytes([0]) + init + freq(1, 1, cstr(b"dir")) + freq(27, 2, u32(0) + u32(0))
        + freq(28, 2, read_in(1, 0, 4096)) + freq(44, 2, read_in(1, 0, 4096))
        + freq(29, 2, u64(1) + u32(0) + u32(0) + u64(0))
        + freq(1, 1, cstr(b"link")) + freq(5, 3, b"") + freq(14, 3, u32(0) + u32(0))
        + freq(1, 1, cstr(b"..")) + freq(1, 2, cstr(b"inner")) + freq(4, 4, setattr_in)
        + freq(17, 1, b"") + freq(34, 1, u32(4) + u32(0)) + PROC)
write("fs_request", "dirs_links", dirs)

xattr = (bytes([4]) + init + freq(1, 1, cstr(b"file"))
         + freq(21, 2, u32(5) + u32(0) + cstr(b"user.k") + b"value")
         + freq(22, 2, u32(64) + u32(0) + cstr(b"user.k"))
         + freq(23, 2, u32(256) + u32(0)) + freq(24, 2, cstr(b"user.k"))
         + freq(46, 2, u64(0) + u64(0) + u32(3) + u32(0)) + PROC)
write("fs_request", "xattr_lseek", xattr)

# ---------------------------------------------------------------- net_tx
ETH = b"\xff" * 6 + b"\x02\x00\x00\x00\x00\x01" + b"\x88\xb5"


def ntx(payload_len_sel, head, layout=0, extra=b""):
    # tx_chain: 12 header bytes, frame len sel (+u16), blob(head), layout (+splits)
    return bytes([0]) + bytes(12) + payload_len_sel + blob(head) + bytes([layout]) + extra


FEAT_ALL = bytes([9, 0])
tx = (bytes([0]) + FEAT_ALL + ntx(bytes([5]) + u16(60), ETH) + bytes([3])
      + ntx(bytes([5]) + u16(1500), ETH + b"payload", layout=2, extra=u16(5) + u16(700)) + bytes([3])
      + ntx(bytes([1]), ETH[:13]) + ntx(bytes([4]), ETH) + bytes([3]))
write("net_tx", "tx", tx)

rx = (bytes([0]) + FEAT_ALL + bytes([4, 3, 0]) + bytes([5, 4]) + u16(100) + blob(bytes(12) + ETH)
      + bytes([7]) + bytes([5, 4]) + u16(3000) + blob(bytes(12) + ETH) + bytes([4, 0, 2]) + bytes([6])
      + bytes([5, 1]) + blob(b"") + bytes([6]))
write("net_tx", "rx", rx)

mrg = (bytes([0]) + FEAT_ALL + bytes([4, 3, 3, 1]) + u16(200) + u16(300) + bytes([1]) + u16(64) + u16(64)
       + bytes([0]) + u16(1000) + bytes([2]) + u16(10) + u16(10) + u16(10)
       + bytes([5, 4]) + u16(1200) + blob(bytes(12) + ETH) + bytes([7, 6]))
write("net_tx", "mergeable_rx", mrg)

legacy = (bytes([1]) + bytes([9, 1]) + bytes([0]) + bytes(10) + bytes([5]) + u16(60) + blob(ETH)
          + bytes([0]) + bytes([3]) + bytes([4, 0, 0]) + bytes([5, 4]) + u16(80) + blob(bytes(10) + ETH)
          + bytes([7]) + bytes([11, 0, 8]))
write("net_tx", "legacy_hdr", legacy)

# ---------------------------------------------------------------- mmio_transport
# op % 12: 0/1 write(off sel, width sel, u64 value), 2/3 read(off sel, width sel),
# 4 negotiate(bool), 5 setup queue, 6 DRIVER_OK, 7 post, 8 QUEUE_NOTIFY write,
# 9 notify_queue, 10 backend_event, 11 raw ring
NEG = bytes([4, 1])


def post(q, descs, readable_mask=0):
    # descs: list of length selectors (0=64, 1=1526, 2=70000)
    out = bytes([7, q, len(descs) - 1, readable_mask])
    for sel in descs:
        out += bytes([sel]) + blob(b"")
    return out


REG = {"MAGIC": 0, "VERSION": 1, "DEVICE_ID": 2, "STATUS": 15, "INT_STATUS": 13, "INT_ACK": 14,
       "CONFIG": 28, "CONFIG6": 29, "QUEUE_NUM_MAX": 9, "QUEUE_SEL": 8}


def rd(reg, width=0):
    return bytes([2, REG[reg], width])


def wr(reg, v, width=0):
    return bytes([0, REG[reg], width]) + u64(v)


rng = (bytes([0]) + rd("MAGIC") + rd("VERSION") + rd("DEVICE_ID") + NEG + bytes([5, 0, 6])
       + post(0, [0]) + post(0, [1, 2]) + bytes([8, 0]) + rd("INT_STATUS") + wr("INT_ACK", 1)
       + post(0, [0]) + bytes([9, 0]) + wr("STATUS", 0) + rd("STATUS"))
write("mmio_transport", "rng", rng)

net = (bytes([1]) + NEG + bytes([5, 0, 5, 1, 6]) + post(0, [1]) + post(1, [0, 1], readable_mask=3)
       + bytes([8, 1, 8, 0, 10]) + rd("CONFIG") + rd("CONFIG", 200) + rd("CONFIG6", 215)
       + bytes([9, 1]) + wr("STATUS", 0) + NEG + bytes([5, 1, 6]) + post(1, [0], readable_mask=1) + bytes([9, 1]))
write("mmio_transport", "net", net)

out_of_order = (bytes([0]) + wr("STATUS", 4) + wr("STATUS", 1) + wr("STATUS", 3) + bytes([5, 0])
                + wr("STATUS", 11) + wr("STATUS", 1) + rd("STATUS", 200) + wr("QUEUE_SEL", 7)
                + rd("QUEUE_NUM_MAX") + bytes([5, 1]) + NEG + bytes([5, 0, 6, 5, 0]) + post(0, [0])
                + bytes([11, 0, 0]) + u16(100) + bytes([8, 0]) + wr("STATUS", 0))
write("mmio_transport", "out_of_order", out_of_order)

# legacy_pio: (op, offset, value) triples; op bit 0 = write, bit 1 = i8042 (else serial),
# bits 5-7 pick the width (0: one byte).
def pio(op, offset, value):
    return bytes([op, offset, value])


hello = b"".join(pio(1, 0, c) for c in b"husk console\n")
write("legacy_pio", "serial_text", hello)
dlab = (pio(1, 3, 0x80) + pio(1, 0, 1) + pio(1, 1, 0) + pio(1, 3, 0x03) + pio(0, 5, 0)
        + pio(1, 4, 0x10) + hello + pio(1, 4, 0) + pio(0, 0, 0) + pio(0, 2, 0))
write("legacy_pio", "serial_dlab_loopback", dlab)
write("legacy_pio", "i8042_reset", pio(2, 4, 0) + pio(3, 4, 0x20) + pio(2, 0, 0) + pio(3, 4, 0xFE))

print("seeds written under", os.path.join(HERE, "corpus"))
