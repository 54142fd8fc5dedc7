//! Shared helpers of the root tests: privilege check, netns/veth and pin
//! guards that clean up on drop, pods, the classifier on their veths, the
//! final audit, frame builders.
#![allow(dead_code)]

use std::fs::File;
use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::process::Command;
use std::thread;
use std::time::Duration;

use sluice_xdp::{
    AttachMode, ClassifierConfig, FrameAccounting, IfaceConfig, IfaceRole, LoaderOptions, SocketId,
    XdpLoader, Xsk, XskConfig,
};

/// Fails the test unless running as root; with SLUICE_ALLOW_SKIP=1 returns
/// false (the caller skips, printing why).
pub fn require_root(test: &str) -> bool {
    if nix::unistd::geteuid().is_root() {
        return true;
    }
    let why = format!("{test}: needs root (CAP_NET_ADMIN, CAP_BPF, CAP_IPC_LOCK)");
    if std::env::var("SLUICE_ALLOW_SKIP").as_deref() == Ok("1") {
        eprintln!("skipping {why}");
        return false;
    }
    panic!("{why}; run as root or set SLUICE_ALLOW_SKIP=1");
}

/// Runs a command, panicking with its output if it fails.
pub fn sh(args: &[&str]) -> String {
    let out = Command::new(args[0])
        .args(&args[1..])
        .output()
        .unwrap_or_else(|e| panic!("{args:?}: {e}"));
    assert!(
        out.status.success(),
        "{args:?} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Runs a command, ignoring failure (cleanup paths).
pub fn sh_quiet(args: &[&str]) {
    let _ = Command::new(args[0]).args(&args[1..]).output();
}

/// A network namespace removed on drop.
pub struct NetNs {
    pub name: String,
}

impl NetNs {
    pub fn new(name: String) -> Self {
        sh_quiet(&["ip", "netns", "del", &name]);
        sh(&["ip", "netns", "add", &name]);
        sh(&["ip", "-n", &name, "link", "set", "lo", "up"]);
        Self { name }
    }

    pub fn exec(&self, args: &[&str]) -> String {
        let mut full = vec!["ip", "netns", "exec", &self.name];
        full.extend_from_slice(args);
        sh(&full)
    }

    /// Moves the calling thread into this namespace.
    pub fn enter(&self) {
        let f = File::open(format!("/run/netns/{}", self.name)).expect("netns file");
        nix::sched::setns(f, nix::sched::CloneFlags::CLONE_NEWNET).expect("setns");
    }
}

impl Drop for NetNs {
    fn drop(&mut self) {
        sh_quiet(&["ip", "netns", "del", &self.name]);
    }
}

/// A host-side veth (its peer lives in a pod namespace); deleted on drop.
pub struct Veth {
    pub host: String,
}

impl Drop for Veth {
    fn drop(&mut self) {
        sh_quiet(&["ip", "link", "del", &self.host]);
    }
}

/// A pin directory removed (recursively) on drop, whatever the loader did.
pub struct PinGuard {
    pub dir: PathBuf,
}

impl Drop for PinGuard {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
        if let Some(parent) = self.dir.parent() {
            let _ = std::fs::remove_dir(parent);
        }
    }
}

pub fn mac_of(ifname: &str, ns: Option<&NetNs>) -> [u8; 6] {
    let path = format!("/sys/class/net/{ifname}/address");
    let s = match ns {
        Some(ns) => ns.exec(&["cat", &path]),
        None => std::fs::read_to_string(&path).expect("mac"),
    };
    let mut mac = [0u8; 6];
    for (i, part) in s.trim().split(':').enumerate() {
        mac[i] = u8::from_str_radix(part, 16).expect("hex");
    }
    mac
}

pub fn mac_str(mac: [u8; 6]) -> String {
    mac.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

/// Ethernet + IPv4 + UDP/TCP header frame with `payload` bytes.
pub fn ipv4_frame(dst: [u8; 4], proto: u8, dport: u16, payload: usize) -> Vec<u8> {
    let mut f = vec![0u8; 14];
    f[0..6].copy_from_slice(&[0x02, 0, 0, 0, 0, 2]);
    f[6..12].copy_from_slice(&[0x02, 0, 0, 0, 0, 1]);
    f[12..14].copy_from_slice(&0x0800u16.to_be_bytes());
    let l4 = if proto == 6 { 20 } else { 8 };
    let total = (20 + l4 + payload) as u16;
    let mut ip = [0u8; 20];
    ip[0] = 0x45;
    ip[2..4].copy_from_slice(&total.to_be_bytes());
    ip[8] = 64;
    ip[9] = proto;
    ip[12..16].copy_from_slice(&[10, 244, 1, 2]);
    ip[16..20].copy_from_slice(&dst);
    f.extend_from_slice(&ip);
    let mut l4h = vec![0u8; l4];
    l4h[0..2].copy_from_slice(&40000u16.to_be_bytes());
    l4h[2..4].copy_from_slice(&dport.to_be_bytes());
    f.extend_from_slice(&l4h);
    f.extend(std::iter::repeat_n(0xab, payload));
    f
}

pub fn arp_frame() -> Vec<u8> {
    let mut f = vec![0xff; 6];
    f.extend_from_slice(&[0x02, 0, 0, 0, 0, 1]);
    f.extend_from_slice(&0x0806u16.to_be_bytes());
    f.extend_from_slice(&[0, 1, 8, 0, 6, 4, 0, 1]);
    f.extend_from_slice(&[
        0x02, 0, 0, 0, 0, 1, 10, 244, 1, 2, 0, 0, 0, 0, 0, 0, 10, 244, 1, 3,
    ]);
    f.resize(60, 0);
    f
}

pub fn ipv6_frame(next_header: u8) -> Vec<u8> {
    let mut f = vec![0x33, 0x33, 0, 0, 0, 1, 0x02, 0, 0, 0, 0, 1];
    f.extend_from_slice(&0x86ddu16.to_be_bytes());
    let mut ip = [0u8; 40];
    ip[0] = 0x60;
    ip[4..6].copy_from_slice(&8u16.to_be_bytes());
    ip[6] = next_header;
    ip[7] = 64;
    f.extend_from_slice(&ip);
    f.extend_from_slice(&[0u8; 8]);
    f
}

/// A pod as Sluice's CNI wires one: netns `ns_name` with `eth0` (MTU `mtu`, address `ip`/32,
/// default route via 169.254.1.1 onlink with a permanent neighbor entry for the host veth's MAC),
/// its peer `host_if` up in this namespace. Returns the netns, the host veth and the host MAC.
pub fn wire_pod(ns_name: String, host_if: String, ip: &str, mtu: &str) -> (NetNs, Veth, [u8; 6]) {
    let ns = NetNs::new(ns_name);
    sh_quiet(&["ip", "link", "del", &host_if]);
    sh(&[
        "ip", "link", "add", &host_if, "mtu", mtu, "type", "veth", "peer", "name", "eth0", "netns",
        &ns.name,
    ]);
    let veth = Veth { host: host_if };
    sh(&["ip", "link", "set", &veth.host, "up"]);
    let host_mac = mac_of(&veth.host, None);
    let addr = format!("{ip}/32");
    ns.exec(&["ip", "link", "set", "eth0", "mtu", mtu, "up"]);
    ns.exec(&["ip", "addr", "add", &addr, "dev", "eth0"]);
    ns.exec(&[
        "ip",
        "route",
        "add",
        "169.254.1.1",
        "dev",
        "eth0",
        "scope",
        "link",
    ]);
    ns.exec(&[
        "ip",
        "route",
        "add",
        "default",
        "via",
        "169.254.1.1",
        "dev",
        "eth0",
    ]);
    let lladdr = mac_str(host_mac);
    ns.exec(&[
        "ip",
        "neigh",
        "add",
        "169.254.1.1",
        "lladdr",
        &lladdr,
        "dev",
        "eth0",
        "nud",
        "permanent",
    ]);
    (ns, veth, host_mac)
}

/// A pod as [`wire_pod`] makes one, with its eth0's MAC and its host veth's MAC.
pub struct Pod {
    pub ns: NetNs,
    pub veth: Veth,
    pub mac: [u8; 6],
    pub host_mac: [u8; 6],
}

/// [`wire_pod`] at `mtu`; `tx_checksum` false turns the pod's tx checksum offload off (its frames
/// then carry complete checksums), true leaves it as a pod's veth has it (frames leave with the
/// pseudo-header sum only: CHECKSUM_PARTIAL).
pub fn pod(ns_name: String, host_if: String, ip: Ipv4Addr, mtu: &str, tx_checksum: bool) -> Pod {
    let (ns, veth, host_mac) = wire_pod(ns_name, host_if, &ip.to_string(), mtu);
    if !tx_checksum {
        ns.exec(&["ethtool", "-K", "eth0", "tx", "off"]);
    }
    let mac = mac_of("eth0", Some(&ns));
    Pod {
        ns,
        veth,
        mac,
        host_mac,
    }
}

/// A test node's classifier, attached to some host veths; its pins are removed on drop, after
/// the loader.
pub struct Node {
    pub loader: XdpLoader,
    /// The host veths it is attached to, in the order given.
    pub ifindexes: Vec<u32>,
    _pins: PinGuard,
}

/// Loads the classifier as node `node` (default config) and attaches it natively to each of
/// `hosts` as a fail-open pod interface.
pub fn classifier_on_pods(node: String, hosts: &[&str]) -> Node {
    let opts = LoaderOptions::new(node);
    let pins = PinGuard {
        dir: opts.pin_dir(),
    };
    let loader = XdpLoader::load(&opts).unwrap();
    loader.set_config(&ClassifierConfig::default()).unwrap();
    let pod_cfg = IfaceConfig {
        role: IfaceRole::Pod,
        fail_closed: false,
        redirect_all: false,
    };
    let ifindexes = hosts
        .iter()
        .map(|h| loader.attach(h, pod_cfg, AttachMode::Native).unwrap())
        .collect();
    Node {
        loader,
        ifindexes,
        _pins: pins,
    }
}

impl Node {
    /// Frame accounting at the end of a traffic test: takes `sockets` (one per attached veth,
    /// in order, queue 0) out of the XSKMAP so nothing new arrives, drops what arrived after the
    /// forwarder stopped (late ACKs), lets tx complete; then every chunk must be free or in a
    /// fill ring, exactly once.
    pub fn quiesce_and_audit(&mut self, xsk: &mut Xsk, sockets: &[SocketId]) -> FrameAccounting {
        for ifindex in &self.ifindexes {
            self.loader.unregister_socket(*ifindex, 0).unwrap();
        }
        let mut late = xsk.batch();
        for _ in 0..200 {
            let mut got = 0;
            for s in sockets {
                got += xsk.recv(*s, &mut late).unwrap();
                xsk.complete(&mut late).unwrap();
            }
            xsk.flush().unwrap();
            if got == 0 && xsk.accounting().tx == 0 {
                break;
            }
            thread::sleep(Duration::from_millis(10));
        }
        let acc = xsk.audit_quiescent().unwrap();
        eprintln!("accounting: {acc:?}");
        assert!(acc.is_balanced());
        acc
    }

    /// Detaches the classifier and removes its pins (checked).
    pub fn cleanup(self) {
        let dir = self.loader.pin_dir().to_path_buf();
        self.loader.cleanup().unwrap();
        assert!(!dir.exists(), "{} left behind", dir.display());
    }
}

/// Two pods and a worker's UMEM between them: the classifier on both host veths, one socket on
/// each, registered in the XSKMAP.
pub struct PodPair {
    pub pods: [Pod; 2],
    pub node: Node,
    pub xsk: Xsk,
    pub sockets: [SocketId; 2],
}

/// [`PodPair`] of pods at `ips` (netns `slx-<tag>A-<pid>`, host veths `slx<tag>a<pid>`; a `tag`
/// of at most two characters keeps the names within 15), wired as [`pod`] does at `mtu`.
pub fn pod_pair(tag: &str, ips: [Ipv4Addr; 2], mtu: &str, tx_checksum: bool) -> PodPair {
    let pid = std::process::id();
    let [pa, pb] = [("A", "a", ips[0]), ("B", "b", ips[1])].map(|(ns, host, ip)| {
        let (ns, host) = (
            format!("slx-{tag}{ns}-{pid}"),
            format!("slx{tag}{host}{pid}"),
        );
        pod(ns, host, ip, mtu, tx_checksum)
    });
    let mut node = classifier_on_pods(format!("slx-{tag}-{pid}"), &[&pa.veth.host, &pb.veth.host]);
    let mut xsk = Xsk::new(&XskConfig {
        frame_count: 4096,
        fill_size: 1024,
        comp_size: 1024,
        rx_size: 1024,
        tx_size: 1024,
        ..XskConfig::default()
    })
    .unwrap();
    let sockets = [&pa, &pb].map(|p| xsk.open_socket(&p.veth.host, 0).unwrap());
    for (ifindex, s) in node.ifindexes.iter().zip(sockets) {
        node.loader
            .register_socket(*ifindex, 0, xsk.fd(s).unwrap())
            .unwrap();
    }
    PodPair {
        pods: [pa, pb],
        node,
        xsk,
        sockets,
    }
}

/// Runs `f` on a thread in network namespace `ns`.
pub fn in_ns<T: Send + 'static>(
    ns: &str,
    f: impl FnOnce() -> T + Send + 'static,
) -> thread::JoinHandle<T> {
    let path = format!("/run/netns/{ns}");
    thread::spawn(move || {
        let file = File::open(path).expect("netns");
        nix::sched::setns(file, nix::sched::CloneFlags::CLONE_NEWNET).expect("setns");
        f()
    })
}

/// `len` bytes of a pattern that differs with `seed`.
pub fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
        .collect()
}

/// An AF_PACKET socket receiving the frames of one EtherType on one interface of the calling
/// thread's netns, whole (Ethernet header included): what the peer of a transmitting socket sees.
pub struct Capture {
    fd: std::os::fd::OwnedFd,
}

impl Capture {
    /// Opens and binds the capture on `ifname` for `ethertype`; `recv` waits at most `timeout`.
    pub fn open(ifname: &str, ethertype: u16, timeout: Duration) -> Self {
        use std::os::fd::FromRawFd;
        let proto = ethertype.to_be();
        // SAFETY: plain socket(2); the result is checked before use.
        let fd = unsafe {
            libc::socket(
                libc::AF_PACKET,
                libc::SOCK_RAW | libc::SOCK_CLOEXEC,
                i32::from(proto),
            )
        };
        assert!(
            fd >= 0,
            "AF_PACKET socket: {}",
            std::io::Error::last_os_error()
        );
        // SAFETY: `fd` was just returned by socket(2) and is owned by no one else.
        let fd = unsafe { std::os::fd::OwnedFd::from_raw_fd(fd) };
        let name = std::ffi::CString::new(ifname).unwrap();
        // SAFETY: `name` is NUL-terminated and outlives the call.
        let ifindex = unsafe { libc::if_nametoindex(name.as_ptr()) };
        assert!(ifindex > 0, "no interface {ifname}");
        let sll = libc::sockaddr_ll {
            sll_family: libc::AF_PACKET as u16,
            sll_protocol: proto,
            sll_ifindex: ifindex as i32,
            sll_hatype: 0,
            sll_pkttype: 0,
            sll_halen: 0,
            sll_addr: [0; 8],
        };
        // SAFETY: `sll` is a live `struct sockaddr_ll` and its size is passed along.
        let rc = unsafe {
            libc::bind(
                std::os::fd::AsRawFd::as_raw_fd(&fd),
                (&sll as *const libc::sockaddr_ll).cast(),
                size_of::<libc::sockaddr_ll>() as libc::socklen_t,
            )
        };
        assert_eq!(rc, 0, "bind: {}", std::io::Error::last_os_error());
        let tv = libc::timeval {
            tv_sec: timeout.as_secs() as libc::time_t,
            tv_usec: timeout.subsec_micros() as libc::suseconds_t,
        };
        // SAFETY: `tv` is a live timeval and its size is passed along.
        let rc = unsafe {
            libc::setsockopt(
                std::os::fd::AsRawFd::as_raw_fd(&fd),
                libc::SOL_SOCKET,
                libc::SO_RCVTIMEO,
                (&tv as *const libc::timeval).cast(),
                size_of::<libc::timeval>() as libc::socklen_t,
            )
        };
        assert_eq!(rc, 0, "SO_RCVTIMEO: {}", std::io::Error::last_os_error());
        Self { fd }
    }

    /// The next frame, or `None` once the timeout passed without one.
    pub fn recv(&self) -> Option<Vec<u8>> {
        let mut buf = vec![0u8; 65536];
        // SAFETY: `buf` is live and writable for its length.
        let n = unsafe {
            libc::recv(
                std::os::fd::AsRawFd::as_raw_fd(&self.fd),
                buf.as_mut_ptr().cast(),
                buf.len(),
                0,
            )
        };
        let n = usize::try_from(n).ok()?;
        buf.truncate(n);
        Some(buf)
    }
}

/// Captures up to `count` frames of `ethertype` on `eth0` of netns `ns` (see [`Capture`]),
/// returning once the capture is open; join the handle for the frames (fewer if `timeout` passed
/// without one).
pub fn capture_in(
    ns: &str,
    ethertype: u16,
    count: usize,
    timeout: Duration,
) -> thread::JoinHandle<Vec<Vec<u8>>> {
    let (ready, opened) = std::sync::mpsc::channel();
    let h = in_ns(ns, move || {
        let cap = Capture::open("eth0", ethertype, timeout);
        ready.send(()).unwrap();
        let mut got = Vec::new();
        while got.len() < count {
            match cap.recv() {
                Some(f) => got.push(f),
                None => break,
            }
        }
        got
    });
    opened.recv().expect("capture opened");
    h
}

/// Sends one UDP datagram of `payload` from `from` (in netns `ns`) to `to`.
pub fn send_udp(ns: &str, from: Ipv4Addr, to: std::net::SocketAddrV4, payload: Vec<u8>) {
    in_ns(ns, move || {
        let sock = std::net::UdpSocket::bind(std::net::SocketAddrV4::new(from, 0)).unwrap();
        sock.send_to(&payload, to).unwrap();
    })
    .join()
    .unwrap();
}

/// Ethernet header to `dst` from `src` with EtherType `ethertype`.
pub fn ethernet(dst: [u8; 6], src: [u8; 6], ethertype: u16) -> [u8; 14] {
    let mut h = [0u8; 14];
    h[..6].copy_from_slice(&dst);
    h[6..12].copy_from_slice(&src);
    h[12..].copy_from_slice(&ethertype.to_be_bytes());
    h
}

/// Receives on `s` into `batch` until it holds a packet that `wanted(total_len)` accepts (other
/// packets are dropped), for at most 5 s; returns its index in the batch.
pub fn recv_packet(
    xsk: &mut Xsk,
    s: SocketId,
    batch: &mut sluice_xdp::RxBatch,
    wanted: impl Fn(usize) -> bool,
) -> usize {
    let until = std::time::Instant::now() + Duration::from_secs(5);
    while std::time::Instant::now() < until {
        let n = xsk.recv(s, batch).unwrap();
        if let Some(i) = (0..n).find(|&i| wanted(xsk.frame(batch, i).unwrap().total_len())) {
            return i;
        }
        xsk.flush().unwrap();
        thread::sleep(Duration::from_millis(2));
    }
    panic!("no wanted packet arrived on {s:?} within 5 s");
}

/// Copies `parts` (in order) to `head[start..]`, continuing into `tails` in order, each filled to
/// its length when `head` is full, as the segmenter's `write_next` does; returns the bytes in
/// `head` from `start`, the tail buffers used and the bytes in the last one.
pub fn scatter(
    parts: &[&[u8]],
    head: &mut [u8],
    start: usize,
    tails: &mut [&mut [u8]],
) -> (usize, usize, usize) {
    let bytes: Vec<u8> = parts.concat();
    let head_len = bytes.len().min(head.len() - start);
    head[start..start + head_len].copy_from_slice(&bytes[..head_len]);
    let (mut done, mut used, mut last) = (head_len, 0, 0);
    for t in tails.iter_mut() {
        if done == bytes.len() {
            break;
        }
        let n = t.len().min(bytes.len() - done);
        t[..n].copy_from_slice(&bytes[done..done + n]);
        (done, used, last) = (done + n, used + 1, n);
    }
    assert_eq!(done, bytes.len(), "the buffers hold the packet");
    (head_len, used, last)
}

/// The bytes `range` of the packet whose buffers are `bufs` (in order), as slices of them.
pub fn sub_slices<'a>(bufs: &[&'a [u8]], range: std::ops::Range<usize>) -> Vec<&'a [u8]> {
    let mut out = Vec::new();
    let mut at = 0;
    for b in bufs {
        let (lo, hi) = (range.start.max(at), range.end.min(at + b.len()));
        if lo < hi {
            out.push(&b[lo - at..hi - at]);
        }
        at += b.len();
    }
    out
}

/// A UDP socket bound to `addr` in netns `ns` that collects datagrams until none came for
/// `quiet`; returns once it is bound. Join the handle for the datagrams.
pub fn udp_sink(
    ns: &str,
    addr: std::net::SocketAddrV4,
    quiet: Duration,
) -> thread::JoinHandle<Vec<Vec<u8>>> {
    let (ready, bound) = std::sync::mpsc::channel();
    let h = in_ns(ns, move || {
        let sock = std::net::UdpSocket::bind(addr).unwrap();
        sock.set_read_timeout(Some(quiet)).unwrap();
        ready.send(()).unwrap();
        let mut got = Vec::new();
        let mut buf = vec![0u8; 65536];
        while let Ok(n) = sock.recv(&mut buf) {
            got.push(buf[..n].to_vec());
        }
        got
    });
    bound.recv().expect("sink bound");
    h
}

/// Checks that exactly the frames or datagrams `sent` arrived (`got`), in order, byte for byte;
/// `what` names one in the messages.
pub fn assert_arrived(got: &[Vec<u8>], sent: &[Vec<u8>], what: &str) {
    let lens = |v: &[Vec<u8>]| v.iter().map(Vec::len).collect::<Vec<_>>();
    assert_eq!(lens(got), lens(sent), "{what} lengths: arrived, sent");
    for (k, (g, s)) in got.iter().zip(sent).enumerate() {
        assert!(g == s, "{what} {k}: the bytes differ");
    }
}
