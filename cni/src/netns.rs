//! Reaching into a pod's network namespace without ever moving the plugin's own threads.
//!
//! A netlink socket and an ioctl socket belong to the namespace they were created in. So a
//! dedicated thread is spawned, enters the pod's namespace with `setns`, creates both sockets
//! (the netlink one registered with the caller's tokio runtime), hands them back and exits: the
//! thread that switched namespace dies with its switch, the main thread and the runtime never run
//! in the pod's namespace, and everything afterwards is ordinary async netlink on the sockets.

use std::fs::File;
use std::os::fd::{AsFd, AsRawFd, OwnedFd, RawFd};
use std::path::{Path, PathBuf};

use nix::sched::{CloneFlags, setns};
use nix::sys::socket::{AddressFamily, SockFlag, SockType, socket};

use crate::error::{CniError, Code, env, io};

/// An open network namespace of a pod.
#[derive(Debug)]
pub struct PodNetns {
    file: File,
    path: PathBuf,
}

/// Sockets living in a pod's network namespace.
pub struct NetnsSockets {
    pub handle: rtnetlink::Handle,
    /// An `AF_INET` datagram socket for interface ioctls (ethtool) in that namespace.
    pub ioctl: OwnedFd,
}

impl PodNetns {
    /// Open the namespace at `path` (`CNI_NETNS`).
    pub fn open(path: &str) -> Result<Self, CniError> {
        let file = File::open(path).map_err(|e| {
            if e.kind() == std::io::ErrorKind::NotFound {
                CniError::new(
                    Code::ContainerUnknown,
                    format!("network namespace {path} (CNI_NETNS) does not exist; the container is gone or was never created"),
                )
            } else {
                env(format!("cannot open network namespace {path} (CNI_NETNS): {e}"))
            }
        })?;
        Ok(Self {
            file,
            path: PathBuf::from(path),
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn fd(&self) -> RawFd {
        self.file.as_raw_fd()
    }

    /// Create sockets inside the namespace from a dedicated, short-lived thread. Must be called
    /// within a tokio runtime (the netlink connection is registered with it).
    pub fn sockets(&self) -> Result<NetnsSockets, CniError> {
        let runtime = tokio::runtime::Handle::current();
        let path = self.path.display().to_string();
        let made = std::thread::scope(|scope| {
            scope
                .spawn(|| {
                    setns(self.file.as_fd(), CloneFlags::CLONE_NEWNET).map_err(|e| {
                        env(format!("{path} (CNI_NETNS) is not a network namespace this plugin can enter: {e}"))
                    })?;
                    let _entered = runtime.enter();
                    let (connection, handle, _) = rtnetlink::new_connection()
                        .map_err(|e| io(format!("cannot open netlink in {path}: {e}")))?;
                    let ioctl = socket(AddressFamily::Inet, SockType::Datagram, SockFlag::SOCK_CLOEXEC, None)
                        .map_err(|e| io(format!("cannot open a socket in {path}: {e}")))?;
                    Ok::<_, CniError>((connection, handle, ioctl))
                })
                .join()
        });
        let (connection, handle, ioctl) = made.map_err(|_| io("the netns thread panicked"))??;
        tokio::spawn(connection);
        Ok(NetnsSockets { handle, ioctl })
    }
}

/// Host-side sockets: the plugin's own namespace.
pub fn host_sockets() -> Result<NetnsSockets, CniError> {
    let (connection, handle, _) =
        rtnetlink::new_connection().map_err(|e| io(format!("cannot open netlink: {e}")))?;
    tokio::spawn(connection);
    let ioctl = socket(
        AddressFamily::Inet,
        SockType::Datagram,
        SockFlag::SOCK_CLOEXEC,
        None,
    )
    .map_err(|e| io(format!("cannot open a socket: {e}")))?;
    Ok(NetnsSockets { handle, ioctl })
}

const SIOCETHTOOL: libc::c_ulong = 0x8946;
const ETHTOOL_GTXCSUM: u32 = 0x16;
const ETHTOOL_STXCSUM: u32 = 0x17;

/// `struct ethtool_value`.
#[repr(C)]
struct EthtoolValue {
    cmd: u32,
    data: u32,
}

/// `struct ifreq` with the `ifr_data` member of its union (40 bytes on 64-bit Linux).
#[repr(C)]
struct IfreqData {
    name: [u8; libc::IFNAMSIZ],
    data: *mut EthtoolValue,
    _pad: [u8; 16],
}

fn ethtool(sock: &OwnedFd, ifname: &str, value: &mut EthtoolValue) -> Result<(), std::io::Error> {
    let bytes = ifname.as_bytes();
    if bytes.len() >= libc::IFNAMSIZ {
        return Err(std::io::Error::from_raw_os_error(libc::EINVAL));
    }
    let mut req = IfreqData {
        name: [0; libc::IFNAMSIZ],
        data: value,
        _pad: [0; 16],
    };
    req.name[..bytes.len()].copy_from_slice(bytes);
    // SAFETY: `req` is a valid, NUL-terminated ifreq whose data pointer refers to `value`, which
    // outlives the call; SIOCETHTOOL reads and writes only those two structures.
    let rc = unsafe {
        libc::ioctl(
            sock.as_raw_fd(),
            SIOCETHTOOL as _,
            &mut req as *mut IfreqData,
        )
    };
    if rc < 0 {
        Err(std::io::Error::last_os_error())
    } else {
        Ok(())
    }
}

/// Turn tx checksum offload on or off for `ifname` in the socket's namespace (`ethtool -K <if>
/// tx on|off`). Pods keep it on: their frames leave with partial checksums, which the node's
/// dataplane completes only where a receiver needs it (a pod on the same node takes them partial).
pub fn set_tx_checksum(sock: &OwnedFd, ifname: &str, on: bool) -> Result<(), CniError> {
    let mut v = EthtoolValue {
        cmd: ETHTOOL_STXCSUM,
        data: u32::from(on),
    };
    ethtool(sock, ifname, &mut v).map_err(|e| {
        io(format!(
            "cannot turn tx checksum offload {} on {ifname}: {e}",
            if on { "on" } else { "off" }
        ))
    })
}

/// Whether tx checksum offload is on for `ifname`.
pub fn tx_checksum(sock: &OwnedFd, ifname: &str) -> Result<bool, CniError> {
    let mut v = EthtoolValue {
        cmd: ETHTOOL_GTXCSUM,
        data: 0,
    };
    ethtool(sock, ifname, &mut v)
        .map_err(|e| io(format!("cannot read tx checksum offload of {ifname}: {e}")))?;
    Ok(v.data != 0)
}
