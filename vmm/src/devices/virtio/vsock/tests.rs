//! Device-level tests: the vsock device, the hybrid muxer and real Unix sockets, driven by a
//! fake guest through guest memory and split virtqueues.

use std::io::{ErrorKind, Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::time::Duration;

use super::defs::*;
use super::packet::PktHeader;
use super::test_utils::*;

const TIMEOUT: Option<Duration> = Some(Duration::from_secs(5));

fn of_op(pkts: &[(PktHeader, Vec<u8>)], op: u16) -> Vec<(PktHeader, Vec<u8>)> {
    pkts.iter().filter(|(h, _)| h.op == op).cloned().collect()
}

fn only(pkts: &[(PktHeader, Vec<u8>)], op: u16) -> PktHeader {
    let found = of_op(pkts, op);
    assert_eq!(found.len(), 1, "expected one op {op} in {pkts:?}");
    found[0].0
}

fn accept(listener: &UnixListener) -> UnixStream {
    let (s, _) = listener.accept().unwrap();
    s.set_read_timeout(TIMEOUT).unwrap();
    s
}

fn rw(src: u32, dst: u32, data: &[u8]) -> PktHeader {
    let mut h = guest_hdr(src, dst, VIRTIO_VSOCK_OP_RW);
    h.len = data.len() as u32;
    h
}

/// Guest connects to host port `port` from guest port `src`; returns the host's end.
fn guest_connect(ctx: &mut TestCtx, listener: &UnixListener, src: u32, port: u32) -> UnixStream {
    ctx.guest
        .send(guest_hdr(src, port, VIRTIO_VSOCK_OP_REQUEST), &[]);
    let pkts = ctx.pump();
    let resp = only(&pkts, VIRTIO_VSOCK_OP_RESPONSE);
    assert_eq!(resp.src_cid, VSOCK_HOST_CID);
    assert_eq!(resp.dst_cid, GUEST_CID);
    assert_eq!(resp.src_port, port);
    assert_eq!(resp.dst_port, src);
    assert_eq!(resp.type_, VIRTIO_VSOCK_TYPE_STREAM);
    assert_eq!(resp.buf_alloc, ctx.muxer().config().conn_buf_size);
    accept(listener)
}

/// Host client connects to guest port `port`; the guest accepts. Returns the client stream
/// (after reading `OK <port>\n`) and the host-side port.
fn host_connect(ctx: &mut TestCtx, port: u32) -> (UnixStream, u32) {
    let mut client = UnixStream::connect(&ctx.uds).unwrap();
    client.set_read_timeout(TIMEOUT).unwrap();
    client
        .write_all(format!("CONNECT {port}\n").as_bytes())
        .unwrap();
    let pkts = ctx.pump();
    let req = only(&pkts, VIRTIO_VSOCK_OP_REQUEST);
    assert_eq!(req.src_cid, VSOCK_HOST_CID);
    assert_eq!(req.dst_cid, GUEST_CID);
    assert_eq!(req.dst_port, port);
    assert!(req.src_port >= 1 << 30);
    let mut resp = guest_hdr(port, req.src_port, VIRTIO_VSOCK_OP_RESPONSE);
    resp.src_port = port;
    resp.dst_port = req.src_port;
    ctx.guest.send(resp, &[]);
    ctx.pump();
    let expect = format!("OK {}\n", req.src_port);
    let mut line = vec![0u8; expect.len()];
    client.read_exact(&mut line).unwrap();
    assert_eq!(String::from_utf8(line).unwrap(), expect);
    (client, req.src_port)
}

fn payload(pkts: &[(PktHeader, Vec<u8>)]) -> Vec<u8> {
    of_op(pkts, VIRTIO_VSOCK_OP_RW)
        .into_iter()
        .flat_map(|(_, d)| d)
        .collect()
}

fn assert_eof(stream: &mut UnixStream) {
    let mut buf = [0u8; 16];
    match stream.read(&mut buf) {
        Ok(0) => {}
        Err(e) if e.kind() == ErrorKind::ConnectionReset => {}
        other => panic!("expected EOF, got {other:?}"),
    }
}

fn assert_clean(ctx: &TestCtx) {
    assert_eq!(ctx.muxer().connection_count(), 0, "connections leaked");
    assert_eq!(ctx.muxer().handshake_count(), 0, "handshakes leaked");
    assert_eq!(ctx.muxer().tracked_fds(), 0, "fds leaked");
}

#[test]
fn guest_connects_to_host_listener_and_data_flows_both_ways() {
    let mut ctx = TestCtx::new();
    let listener = ctx.host_listener(5000);
    let mut host = guest_connect(&mut ctx, &listener, 1234, 5000);

    ctx.guest.send(rw(1234, 5000, b"ping"), b"ping");
    ctx.pump();
    let mut got = [0u8; 4];
    host.read_exact(&mut got).unwrap();
    assert_eq!(&got, b"ping");

    host.write_all(b"pong").unwrap();
    let pkts = ctx.pump();
    assert_eq!(payload(&pkts), b"pong");
    let (h, _) = &of_op(&pkts, VIRTIO_VSOCK_OP_RW)[0];
    assert_eq!((h.src_port, h.dst_port), (5000, 1234));
    assert_eq!(h.fwd_cnt, 4, "fwd_cnt counts what the host consumed");
    assert_eq!(ctx.muxer().connection_count(), 1);
}

#[test]
fn guest_connect_without_listener_gets_rst() {
    let mut ctx = TestCtx::new();
    ctx.guest
        .send(guest_hdr(1234, 6000, VIRTIO_VSOCK_OP_REQUEST), &[]);
    let pkts = ctx.pump();
    let rst = only(&pkts, VIRTIO_VSOCK_OP_RST);
    assert_eq!((rst.src_port, rst.dst_port), (6000, 1234));
    assert_clean(&ctx);
}

#[test]
fn host_connect_handshake_and_data() {
    let mut ctx = TestCtx::new();
    let (mut client, local) = host_connect(&mut ctx, 1024);

    client.write_all(b"hello guest").unwrap();
    let pkts = ctx.pump();
    assert_eq!(payload(&pkts), b"hello guest");

    ctx.guest
        .send(rw(1024, local, b"hello host"), b"hello host");
    ctx.pump();
    let mut got = [0u8; 10];
    client.read_exact(&mut got).unwrap();
    assert_eq!(&got, b"hello host");
}

#[test]
fn host_data_sent_right_after_connect_line_is_kept() {
    let mut ctx = TestCtx::new();
    let mut client = UnixStream::connect(&ctx.uds).unwrap();
    client.set_read_timeout(TIMEOUT).unwrap();
    client.write_all(b"CONNECT 1024\nearly").unwrap();
    let pkts = ctx.pump();
    let req = only(&pkts, VIRTIO_VSOCK_OP_REQUEST);
    // Nothing is forwarded before the guest accepts.
    assert!(of_op(&pkts, VIRTIO_VSOCK_OP_RW).is_empty());
    ctx.guest
        .send(guest_hdr(1024, req.src_port, VIRTIO_VSOCK_OP_RESPONSE), &[]);
    let pkts = ctx.pump();
    assert_eq!(payload(&pkts), b"early");
}

#[test]
fn host_connect_refused_by_guest_closes_stream() {
    let mut ctx = TestCtx::new();
    let mut client = UnixStream::connect(&ctx.uds).unwrap();
    client.set_read_timeout(TIMEOUT).unwrap();
    client.write_all(b"CONNECT 99\n").unwrap();
    let pkts = ctx.pump();
    let req = only(&pkts, VIRTIO_VSOCK_OP_REQUEST);
    ctx.guest
        .send(guest_hdr(99, req.src_port, VIRTIO_VSOCK_OP_RST), &[]);
    let pkts = ctx.pump();
    assert!(pkts.is_empty(), "no reply to an RST: {pkts:?}");
    assert_eof(&mut client);
    assert_clean(&ctx);
}

#[test]
fn bad_handshakes_are_closed_and_do_not_block_others() {
    let mut ctx = TestCtx::new();
    let mut garbage = UnixStream::connect(&ctx.uds).unwrap();
    garbage.set_read_timeout(TIMEOUT).unwrap();
    garbage.write_all(b"HELLO THERE\n").unwrap();
    let mut long = UnixStream::connect(&ctx.uds).unwrap();
    long.set_read_timeout(TIMEOUT).unwrap();
    long.write_all(&[b'9'; 100]).unwrap();
    // Connects and says nothing.
    let mut silent = UnixStream::connect(&ctx.uds).unwrap();
    silent.set_read_timeout(TIMEOUT).unwrap();
    let pkts = ctx.pump();
    assert!(pkts.is_empty());
    assert_eof(&mut garbage);
    assert_eof(&mut long);
    assert_eq!(ctx.muxer().handshake_count(), 1);

    // A good client is served while the silent one still hangs around.
    let (_client, _) = host_connect(&mut ctx, 1024);

    // The silent one is closed once its handshake deadline passes.
    std::thread::sleep(Duration::from_millis(300));
    ctx.pump();
    assert_eof(&mut silent);
    assert_eq!(ctx.muxer().handshake_count(), 0);
}

#[test]
fn host_to_guest_respects_guest_credit() {
    let mut ctx = TestCtx::new();
    let listener = ctx.host_listener(5000);
    // The guest has only 100 bytes of buffer.
    let mut req = guest_hdr(1234, 5000, VIRTIO_VSOCK_OP_REQUEST);
    req.buf_alloc = 100;
    ctx.guest.send(req, &[]);
    ctx.pump();
    let mut host = accept(&listener);

    host.write_all(&[5u8; 1000]).unwrap();
    let pkts = ctx.pump();
    assert_eq!(
        payload(&pkts).len(),
        100,
        "never more than the guest's credit"
    );
    only(&pkts, VIRTIO_VSOCK_OP_CREDIT_REQUEST);
    // Stalled: nothing more however often the device runs.
    assert!(ctx.pump().is_empty());

    // The guest consumed 100 bytes and says so.
    let mut upd = guest_hdr(1234, 5000, VIRTIO_VSOCK_OP_CREDIT_UPDATE);
    upd.buf_alloc = 100;
    upd.fwd_cnt = 100;
    ctx.guest.send(upd, &[]);
    let pkts = ctx.pump();
    assert_eq!(payload(&pkts).len(), 100);

    // A larger buffer lets the rest through.
    upd.buf_alloc = 10_000;
    upd.fwd_cnt = 200;
    ctx.guest.send(upd, &[]);
    let pkts = ctx.pump();
    assert_eq!(payload(&pkts).len(), 800);
}

#[test]
fn guest_credit_request_gets_credit_update() {
    let mut ctx = TestCtx::new();
    let listener = ctx.host_listener(5000);
    let _host = guest_connect(&mut ctx, &listener, 1234, 5000);
    ctx.guest
        .send(guest_hdr(1234, 5000, VIRTIO_VSOCK_OP_CREDIT_REQUEST), &[]);
    let pkts = ctx.pump();
    let upd = only(&pkts, VIRTIO_VSOCK_OP_CREDIT_UPDATE);
    assert_eq!(upd.buf_alloc, ctx.muxer().config().conn_buf_size);
    assert_eq!(upd.fwd_cnt, 0);
}

#[test]
fn host_sends_credit_update_when_guest_view_gets_low() {
    let mut ctx = TestCtx::with_config(|c| c.conn_buf_size = 8192);
    let listener = ctx.host_listener(5000);
    let mut host = guest_connect(&mut ctx, &listener, 1234, 5000);
    let data = vec![9u8; 5000];
    ctx.guest.send(rw(1234, 5000, &data), &data);
    let pkts = ctx.pump();
    let upd = only(&pkts, VIRTIO_VSOCK_OP_CREDIT_UPDATE);
    assert_eq!(upd.fwd_cnt, 5000);
    let mut got = vec![0u8; 5000];
    host.read_exact(&mut got).unwrap();
    // A small write leaves the guest plenty of room: no update.
    ctx.guest.send(rw(1234, 5000, b"x"), b"x");
    assert!(of_op(&ctx.pump(), VIRTIO_VSOCK_OP_CREDIT_UPDATE).is_empty());
}

#[test]
fn guest_overrunning_credit_is_reset() {
    let mut ctx = TestCtx::with_config(|c| c.conn_buf_size = 4096);
    let listener = ctx.host_listener(5000);
    // The host end is never read, so the socket buffer fills and then ours does.
    let _host = guest_connect(&mut ctx, &listener, 1234, 5000);
    // Each packet is within the advertised buffer; only their sum overruns it.
    let chunk = vec![1u8; 4096];
    let mut reset = false;
    for _ in 0..2000 {
        ctx.guest.send(rw(1234, 5000, &chunk), &chunk);
        let pkts = ctx.pump();
        if !of_op(&pkts, VIRTIO_VSOCK_OP_RST).is_empty() {
            reset = true;
            break;
        }
    }
    assert!(reset, "overrun never reset the connection");
    assert_clean(&ctx);
}

#[test]
fn guest_shutdown_send_gives_host_eof_then_close_completes() {
    let mut ctx = TestCtx::new();
    let listener = ctx.host_listener(5000);
    let mut host = guest_connect(&mut ctx, &listener, 1234, 5000);
    let mut sd = guest_hdr(1234, 5000, VIRTIO_VSOCK_OP_SHUTDOWN);
    sd.flags = VIRTIO_VSOCK_SHUTDOWN_SEND;
    ctx.guest.send(sd, &[]);
    assert!(ctx.pump().is_empty());
    assert_eof(&mut host);
    // The host can still answer, then closes.
    host.write_all(b"bye").unwrap();
    drop(host);
    let pkts = ctx.pump();
    assert_eq!(payload(&pkts), b"bye");
    let sd = only(&pkts, VIRTIO_VSOCK_OP_SHUTDOWN);
    assert_eq!(
        sd.flags & VIRTIO_VSOCK_SHUTDOWN_SEND,
        VIRTIO_VSOCK_SHUTDOWN_SEND
    );
    only(&pkts, VIRTIO_VSOCK_OP_RST);
    assert_clean(&ctx);
}

#[test]
fn guest_full_shutdown_is_answered_with_rst() {
    let mut ctx = TestCtx::new();
    let listener = ctx.host_listener(5000);
    let mut host = guest_connect(&mut ctx, &listener, 1234, 5000);
    ctx.guest.send(rw(1234, 5000, b"last"), b"last");
    let mut sd = guest_hdr(1234, 5000, VIRTIO_VSOCK_OP_SHUTDOWN);
    sd.flags = VIRTIO_VSOCK_SHUTDOWN_ALL;
    ctx.guest.send(sd, &[]);
    let pkts = ctx.pump();
    only(&pkts, VIRTIO_VSOCK_OP_RST);
    let mut got = Vec::new();
    host.read_to_end(&mut got).unwrap();
    assert_eq!(got, b"last");
    assert_clean(&ctx);
}

#[test]
fn guest_rst_closes_host_stream() {
    let mut ctx = TestCtx::new();
    let listener = ctx.host_listener(5000);
    let mut host = guest_connect(&mut ctx, &listener, 1234, 5000);
    ctx.guest
        .send(guest_hdr(1234, 5000, VIRTIO_VSOCK_OP_RST), &[]);
    assert!(ctx.pump().is_empty());
    assert_eof(&mut host);
    assert_clean(&ctx);
}

#[test]
fn host_close_sends_shutdown_and_guest_rst_completes() {
    let mut ctx = TestCtx::new();
    let (client, local) = host_connect(&mut ctx, 1024);
    drop(client);
    let pkts = ctx.pump();
    let sd = only(&pkts, VIRTIO_VSOCK_OP_SHUTDOWN);
    assert_eq!(sd.flags, VIRTIO_VSOCK_SHUTDOWN_ALL);
    assert_eq!(ctx.muxer().connection_count(), 1);
    ctx.guest
        .send(guest_hdr(1024, local, VIRTIO_VSOCK_OP_RST), &[]);
    assert!(ctx.pump().is_empty());
    assert_clean(&ctx);
}

#[test]
fn half_closed_connection_is_reaped_after_deadline() {
    let mut ctx = TestCtx::new();
    let listener = ctx.host_listener(5000);
    let host = guest_connect(&mut ctx, &listener, 1234, 5000);
    drop(host);
    let pkts = ctx.pump();
    only(&pkts, VIRTIO_VSOCK_OP_SHUTDOWN);
    // The guest never answers.
    std::thread::sleep(Duration::from_millis(300));
    let pkts = ctx.pump();
    let rst = only(&pkts, VIRTIO_VSOCK_OP_RST);
    assert_eq!((rst.src_port, rst.dst_port), (5000, 1234));
    assert_clean(&ctx);
}

#[test]
fn unanswered_host_connect_times_out() {
    let mut ctx = TestCtx::new();
    let mut client = UnixStream::connect(&ctx.uds).unwrap();
    client.set_read_timeout(TIMEOUT).unwrap();
    client.write_all(b"CONNECT 1024\n").unwrap();
    only(&ctx.pump(), VIRTIO_VSOCK_OP_REQUEST);
    std::thread::sleep(Duration::from_millis(300));
    only(&ctx.pump(), VIRTIO_VSOCK_OP_RST);
    assert_eof(&mut client);
    assert_clean(&ctx);
}

#[test]
fn many_concurrent_connections() {
    let mut ctx = TestCtx::new();
    let listener = ctx.host_listener(5000);
    let n = 200u32;
    let mut hosts = Vec::new();
    for i in 0..n {
        ctx.guest
            .send(guest_hdr(10_000 + i, 5000, VIRTIO_VSOCK_OP_REQUEST), &[]);
        if i % 32 == 31 {
            ctx.pump();
        }
    }
    let pkts = ctx.pump();
    let _ = pkts;
    for _ in 0..n {
        hosts.push(accept(&listener));
    }
    assert_eq!(ctx.muxer().connection_count(), n as usize);
    // Every host end says who it is; the guest must see each on the right connection.
    for (i, h) in hosts.iter_mut().enumerate() {
        h.write_all(format!("conn{i}").as_bytes()).unwrap();
    }
    let mut seen = std::collections::HashMap::new();
    for _ in 0..20 {
        for (h, d) in of_op(&ctx.pump(), VIRTIO_VSOCK_OP_RW) {
            seen.entry(h.dst_port).or_insert_with(Vec::new).extend(d);
        }
    }
    assert_eq!(seen.len(), n as usize);
    // The accept order is the request order, so host i serves guest port 10000+i.
    for i in 0..n {
        assert_eq!(seen[&(10_000 + i)], format!("conn{i}").into_bytes());
    }
    for i in 0..n {
        ctx.guest
            .send(guest_hdr(10_000 + i, 5000, VIRTIO_VSOCK_OP_RST), &[]);
        if i % 32 == 31 {
            ctx.pump();
        }
    }
    ctx.pump();
    assert_clean(&ctx);
}

#[test]
fn connection_limit_refuses_extra_connections() {
    let mut ctx = TestCtx::with_config(|c| c.max_connections = 4);
    let listener = ctx.host_listener(5000);
    let mut hosts = Vec::new();
    for i in 0..4 {
        hosts.push(guest_connect(&mut ctx, &listener, 100 + i, 5000));
    }
    ctx.guest
        .send(guest_hdr(200, 5000, VIRTIO_VSOCK_OP_REQUEST), &[]);
    let rst = only(&ctx.pump(), VIRTIO_VSOCK_OP_RST);
    assert_eq!(rst.dst_port, 200);
    // Host clients beyond the limit are closed at once.
    let mut client = UnixStream::connect(&ctx.uds).unwrap();
    client.set_read_timeout(TIMEOUT).unwrap();
    ctx.pump();
    assert_eof(&mut client);
    assert_eq!(ctx.muxer().connection_count(), 4);
}

#[test]
fn packets_for_unknown_connections_get_rst() {
    let mut ctx = TestCtx::new();
    ctx.guest.send(rw(1, 2, b"zz"), b"zz");
    ctx.guest
        .send(guest_hdr(3, 4, VIRTIO_VSOCK_OP_CREDIT_UPDATE), &[]);
    ctx.guest
        .send(guest_hdr(5, 6, VIRTIO_VSOCK_OP_RESPONSE), &[]);
    // An RST is never answered.
    ctx.guest.send(guest_hdr(7, 8, VIRTIO_VSOCK_OP_RST), &[]);
    let pkts = ctx.pump();
    let rsts = of_op(&pkts, VIRTIO_VSOCK_OP_RST);
    let ports: Vec<_> = rsts.iter().map(|(h, _)| (h.src_port, h.dst_port)).collect();
    assert_eq!(ports, vec![(2, 1), (4, 3), (6, 5)]);
    assert_eq!(pkts.len(), 3);
    assert_clean(&ctx);
}

#[test]
fn wrong_cids_are_dropped_silently() {
    let mut ctx = TestCtx::new();
    let _listener = ctx.host_listener(5000);
    let mut h = guest_hdr(1234, 5000, VIRTIO_VSOCK_OP_REQUEST);
    h.src_cid = 77;
    ctx.guest.send(h, &[]);
    let mut h = guest_hdr(1234, 5000, VIRTIO_VSOCK_OP_REQUEST);
    h.dst_cid = 5;
    ctx.guest.send(h, &[]);
    assert!(ctx.pump().is_empty());
    assert_clean(&ctx);
}

#[test]
fn bad_type_and_unknown_op_get_rst() {
    let mut ctx = TestCtx::new();
    let listener = ctx.host_listener(5000);
    let mut h = guest_hdr(1234, 5000, VIRTIO_VSOCK_OP_REQUEST);
    h.type_ = 2; // SEQPACKET: not offered
    ctx.guest.send(h, &[]);
    only(&ctx.pump(), VIRTIO_VSOCK_OP_RST);
    assert_clean(&ctx);

    let mut host = guest_connect(&mut ctx, &listener, 1234, 5000);
    ctx.guest.send(guest_hdr(1234, 5000, 99), &[]);
    only(&ctx.pump(), VIRTIO_VSOCK_OP_RST);
    assert_eof(&mut host);
    assert_clean(&ctx);

    ctx.guest
        .send(guest_hdr(1, 2, VIRTIO_VSOCK_OP_INVALID), &[]);
    only(&ctx.pump(), VIRTIO_VSOCK_OP_RST);
}

#[test]
fn malformed_tx_chains_do_not_stop_the_device() {
    let mut ctx = TestCtx::new();
    let listener = ctx.host_listener(5000);
    let valid = guest_hdr(1234, 5000, VIRTIO_VSOCK_OP_REQUEST).to_bytes();
    // Header descriptor shorter than a header.
    ctx.guest.send_raw(&[(valid[..20].to_vec(), false)]);
    // Device-writable TX descriptor.
    ctx.guest.send_raw(&[(valid.to_vec(), true)]);
    // A chain pointing outside guest memory.
    ctx.guest.send_descs(&[Desc {
        addr: 1 << 40,
        len: VSOCK_PKT_HDR_SIZE as u32,
        write: false,
    }]);
    // len says 100 but there is no data descriptor at all.
    let mut h = rw(1, 2, &[0; 100]);
    h.len = 100;
    ctx.guest.send_raw(&[(h.to_bytes().to_vec(), false)]);
    // len far above the largest packet.
    let mut h = rw(1, 2, &[]);
    h.len = u32::MAX;
    ctx.guest
        .send_raw(&[(h.to_bytes().to_vec(), false), (vec![0; 16], false)]);
    // Data descriptor that is device-writable.
    let h = rw(1, 2, &[0; 16]);
    ctx.guest
        .send_raw(&[(h.to_bytes().to_vec(), false), (vec![0; 16], true)]);
    let pkts = ctx.pump();
    assert!(pkts.is_empty(), "broken chains of no connection: {pkts:?}");

    // The device still works.
    let _host = guest_connect(&mut ctx, &listener, 1234, 5000);
}

#[test]
fn rw_longer_than_its_buffer_resets_the_connection() {
    let mut ctx = TestCtx::new();
    let listener = ctx.host_listener(5000);
    let mut host = guest_connect(&mut ctx, &listener, 1234, 5000);
    let mut h = rw(1234, 5000, &[0; 100]);
    h.len = 100;
    ctx.guest
        .send_raw(&[(h.to_bytes().to_vec(), false), (vec![7; 10], false)]);
    let rst = only(&ctx.pump(), VIRTIO_VSOCK_OP_RST);
    assert_eq!((rst.src_port, rst.dst_port), (5000, 1234));
    assert_eof(&mut host);
    assert_clean(&ctx);
}

/// Posts one single-descriptor RX buffer, runs the device once, and returns what landed in it.
fn run_with_single_desc_rx(ctx: &mut TestCtx) -> (PktHeader, Vec<u8>) {
    use vm_memory::{Bytes, GuestAddress};
    let addr = ctx.guest.alloc(4096);
    ctx.guest.provide_rx_raw(&[Desc {
        addr,
        len: 4096,
        write: true,
    }]);
    ctx.guest.run(&mut ctx.dev);
    let mut raw = [0u8; VSOCK_PKT_HDR_SIZE];
    ctx.guest
        .mem
        .read_slice(&mut raw, GuestAddress(addr))
        .unwrap();
    let hdr = PktHeader::from_bytes(&raw);
    let mut data = vec![0u8; hdr.len as usize];
    ctx.guest
        .mem
        .read_slice(&mut data, GuestAddress(addr + VSOCK_PKT_HDR_SIZE as u64))
        .unwrap();
    (hdr, data)
}

#[test]
fn single_descriptor_packets_work() {
    // Linux 6.2+ puts header and payload in one descriptor, on TX and RX alike.
    let mut ctx = TestCtx::new();
    let listener = ctx.host_listener(5000);
    ctx.guest
        .send(guest_hdr(1234, 5000, VIRTIO_VSOCK_OP_REQUEST), &[]);
    let (hdr, _) = run_with_single_desc_rx(&mut ctx);
    assert_eq!(hdr.op, VIRTIO_VSOCK_OP_RESPONSE);
    let mut host = accept(&listener);

    let mut bytes = rw(1234, 5000, b"one-desc").to_bytes().to_vec();
    bytes.extend_from_slice(b"one-desc");
    ctx.guest.send_raw(&[(bytes, false)]);
    ctx.guest.run(&mut ctx.dev);
    let mut got = [0u8; 8];
    host.read_exact(&mut got).unwrap();
    assert_eq!(&got, b"one-desc");

    host.write_all(b"reply").unwrap();
    let (hdr, data) = run_with_single_desc_rx(&mut ctx);
    assert_eq!(hdr.op, VIRTIO_VSOCK_OP_RW);
    assert_eq!(data, b"reply");
}

#[test]
fn malformed_rx_buffers_are_returned_empty() {
    let mut ctx = TestCtx::new();
    // A read-only "RX" buffer, then a header-only buffer too short for a header.
    let a = ctx.guest.alloc(4096);
    ctx.guest.provide_rx_raw(&[Desc {
        addr: a,
        len: 4096,
        write: false,
    }]);
    let b = ctx.guest.alloc(4096);
    ctx.guest.provide_rx_raw(&[Desc {
        addr: b,
        len: 10,
        write: true,
    }]);
    ctx.guest
        .send(guest_hdr(1234, 6000, VIRTIO_VSOCK_OP_REQUEST), &[]);
    // The RST lands in the first good buffer after the two bad ones.
    let pkts = ctx.pump();
    only(&pkts, VIRTIO_VSOCK_OP_RST);
}

#[test]
fn no_rx_buffers_means_no_spin_and_delivery_later() {
    let mut ctx = TestCtx::new();
    let listener = ctx.host_listener(5000);
    let mut host = guest_connect(&mut ctx, &listener, 1234, 5000);
    // Use up every RX buffer the fake guest has posted.
    while ctx.guest.rx_outstanding() > 0 {
        host.write_all(b".").unwrap();
        ctx.guest.run(&mut ctx.dev);
        let _ = ctx.guest.recv();
    }
    host.write_all(b"later").unwrap();
    ctx.guest.run(&mut ctx.dev);
    assert!(ctx.dev.has_pending_rx());
    // The readable stream was reported once; with no RX buffer to put its data in, the muxer
    // stops polling it, so the front end's event loop does not spin.
    assert!(
        !backend_ready(&ctx.dev),
        "backend fd must go quiet while the guest has no RX buffers"
    );
    // Once the guest posts buffers, the data arrives.
    let pkts = ctx.pump();
    assert_eq!(payload(&pkts), b"later");
}

#[test]
fn device_reset_drops_everything() {
    let mut ctx = TestCtx::new();
    let listener = ctx.host_listener(5000);
    let mut host = guest_connect(&mut ctx, &listener, 1234, 5000);
    let _client = UnixStream::connect(&ctx.uds).unwrap();
    ctx.pump();
    ctx.dev.reset();
    assert_eof(&mut host);
    assert_clean(&ctx);
}

#[test]
fn config_space_is_guest_cid() {
    let ctx = TestCtx::new();
    assert_eq!(ctx.dev.config_space(), GUEST_CID.to_le_bytes());
    let mut buf = [0xffu8; 12];
    ctx.dev.read_config(0, &mut buf);
    assert_eq!(&buf[..8], &GUEST_CID.to_le_bytes());
    assert_eq!(&buf[8..], &[0; 4]);
    ctx.dev.read_config(u64::MAX, &mut buf);
    assert_eq!(buf, [0; 12]);
}
