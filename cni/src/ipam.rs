//! The built-in IPAM: addresses from the node's pod CIDR, kept in a crash-safe directory.
//!
//! Layout of `<dataDir>/<network>/`:
//! - `lock`: held with `flock(LOCK_EX)` by ADD, DEL and GC for their whole run, so at most one
//!   plugin process changes the directory or the host's pod wiring at a time; the kernel drops
//!   the lock when a process dies, even by SIGKILL.
//! - `<ip>` (e.g. `10.244.1.7`): one file per allocated address holding a [`Record`].
//!   Delegated-IPAM attachments use `att-<hash>` instead.
//! - `last`: the last address handed out (allocation is round robin; losing it is harmless).
//! - `.tmp-*`: files being written. A record is written whole to a temporary file, fsynced, then
//!   published with `link` (fails if the address is taken: no double allocation) or `rename`
//!   (an update), and the directory is fsynced. A reader therefore sees a record whole or not at
//!   all; temporaries found by a lock holder are from a dead process and are removed.
//!
//! Order of an ADD: reserve (record in state `Reserved`) -> wire -> register with the agent ->
//! commit (state `Committed` with the result). A lock holder that finds a `Reserved` record knows
//! its ADD died (SIGKILL) or failed without cleaning up, because the ADD would still hold the lock
//! otherwise: the plugin undoes that attachment's wiring and frees the address before going on.
//! Committed records are freed by DEL, or by GC when the runtime no longer lists them.
//!
//! Addresses: the pod CIDR's network address, the first host address (`.1`, kept for the node's
//! gateway convention, as Flannel's `cni0`), and the broadcast address are never handed out.

use std::fs::{self, File, OpenOptions};
use std::io::{ErrorKind, Write};
use std::net::Ipv4Addr;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use ipnet::Ipv4Net;
use nix::fcntl::{Flock, FlockArg};
use serde::{Deserialize, Serialize};

use crate::error::{CniError, again, io};
use crate::result::CniResult;

/// Where an attachment is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum State {
    /// The address is held by an ADD that has not finished.
    Reserved,
    /// ADD finished; the result is stored.
    Committed,
}

/// One attachment's record.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Record {
    pub container_id: String,
    pub ifname: String,
    pub netns: String,
    pub host_ifname: String,
    pub state: State,
    /// The pod's address (built-in IPAM: also the file name).
    pub ip: Option<Ipv4Addr>,
    /// The delegated IPAM plugin's type, when the address came from one.
    pub delegate: Option<String>,
    pub result: Option<CniResult>,
}

/// The IPAM state of one network, locked.
#[derive(Debug)]
pub struct Store {
    dir: PathBuf,
    _lock: Flock<File>,
}

fn ioerr(what: &str, path: &Path, e: impl std::fmt::Display) -> CniError {
    io(format!("IPAM state: cannot {what} {}: {e}", path.display()))
}

/// FNV-1a 64 of an attachment's identity.
pub fn attachment_hash(container_id: &str, ifname: &str) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in container_id.bytes().chain([0u8]).chain(ifname.bytes()) {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h
}

/// The host-side veth name of an attachment: `sl` + 12 hex digits (14 bytes, under IFNAMSIZ).
pub fn host_ifname(container_id: &str, ifname: &str) -> String {
    format!(
        "sl{:012x}",
        attachment_hash(container_id, ifname) & 0xffff_ffff_ffff
    )
}

/// The record key of a delegated-IPAM attachment.
pub fn delegated_key(container_id: &str, ifname: &str) -> String {
    format!("att-{:016x}", attachment_hash(container_id, ifname))
}

/// The addresses of `subnet` that may be handed out, in order.
pub fn candidates(subnet: Ipv4Net) -> impl Iterator<Item = Ipv4Addr> {
    let (first, last) = usable_range(subnet).unwrap_or((1, 0));
    (first..=last).map(Ipv4Addr::from)
}

/// First and last address that may be handed out (`None` for a /31 or /32).
pub fn usable_range(subnet: Ipv4Net) -> Option<(u32, u32)> {
    let net = u32::from(subnet.network());
    let bcast = u32::from(subnet.broadcast());
    (subnet.prefix_len() <= 30).then(|| (net + 2, bcast - 1))
}

impl Store {
    /// Open (creating it) and lock the state directory; blocks while another plugin holds it.
    pub fn open(dir: &Path) -> Result<Self, CniError> {
        fs::create_dir_all(dir).map_err(|e| ioerr("create", dir, e))?;
        let lock_path = dir.join("lock");
        let file = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .mode(0o600)
            .open(&lock_path)
            .map_err(|e| ioerr("open", &lock_path, e))?;
        let lock = Flock::lock(file, FlockArg::LockExclusive)
            .map_err(|(_, e)| ioerr("lock", &lock_path, e))?;
        let store = Self {
            dir: dir.to_path_buf(),
            _lock: lock,
        };
        store.sweep_temporaries()?;
        Ok(store)
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    fn sweep_temporaries(&self) -> Result<(), CniError> {
        for entry in fs::read_dir(&self.dir).map_err(|e| ioerr("list", &self.dir, e))? {
            let entry = entry.map_err(|e| ioerr("list", &self.dir, e))?;
            if entry.file_name().to_string_lossy().starts_with(".tmp-") {
                let _ = fs::remove_file(entry.path());
            }
        }
        Ok(())
    }

    fn sync_dir(&self) -> Result<(), CniError> {
        File::open(&self.dir)
            .and_then(|d| d.sync_all())
            .map_err(|e| ioerr("sync", &self.dir, e))
    }

    /// Write `bytes` to a fresh temporary file, fsynced.
    fn write_temporary(&self, bytes: &[u8]) -> Result<PathBuf, CniError> {
        let tmp = self.dir.join(format!(".tmp-{}", std::process::id()));
        let _ = fs::remove_file(&tmp);
        let mut f = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&tmp)
            .map_err(|e| ioerr("create", &tmp, e))?;
        f.write_all(bytes)
            .and_then(|_| f.sync_all())
            .map_err(|e| ioerr("write", &tmp, e))?;
        Ok(tmp)
    }

    /// Every record, with its key. Unreadable files are reported on stderr and kept (their
    /// address stays taken: never double-allocate on doubt).
    pub fn records(&self) -> Result<Vec<(String, Record)>, CniError> {
        let mut out = Vec::new();
        for entry in fs::read_dir(&self.dir).map_err(|e| ioerr("list", &self.dir, e))? {
            let entry = entry.map_err(|e| ioerr("list", &self.dir, e))?;
            let name = entry.file_name().to_string_lossy().into_owned();
            if name == "lock" || name == "last" || name.starts_with(".tmp-") {
                continue;
            }
            match fs::read(entry.path()).map(|b| serde_json::from_slice::<Record>(&b)) {
                Ok(Ok(r)) => out.push((name, r)),
                Ok(Err(e)) => eprintln!(
                    "sluice-cni: ignoring unreadable IPAM record {}: {e}",
                    entry.path().display()
                ),
                Err(e) => eprintln!(
                    "sluice-cni: ignoring unreadable IPAM record {}: {e}",
                    entry.path().display()
                ),
            }
        }
        out.sort_by(|a, b| a.0.cmp(&b.0));
        Ok(out)
    }

    /// The record of an attachment.
    pub fn find(
        &self,
        container_id: &str,
        ifname: &str,
    ) -> Result<Option<(String, Record)>, CniError> {
        Ok(self
            .records()?
            .into_iter()
            .find(|(_, r)| r.container_id == container_id && r.ifname == ifname))
    }

    /// Reserve the next free address of `subnet` for `record` (whose `ip` is filled in).
    pub fn reserve_ip(
        &self,
        subnet: Ipv4Net,
        record: &mut Record,
    ) -> Result<(String, Ipv4Addr), CniError> {
        let last = fs::read_to_string(self.dir.join("last"))
            .ok()
            .and_then(|s| s.trim().parse::<Ipv4Addr>().ok());
        let Some((first, end)) = usable_range(subnet) else {
            return Err(crate::error::config(format!(
                "pod CIDR {subnet} has no usable address"
            )));
        };
        let (first, count) = (u64::from(first), u64::from(end - first) + 1);
        let start = last
            .map(|l| u64::from(u32::from(l)))
            .filter(|l| *l >= first && *l < first + count)
            .map(|l| l - first + 1)
            .unwrap_or(0);
        for i in 0..count {
            let offset = (start + i) % count;
            let ip = Ipv4Addr::from(u32::try_from(first + offset).unwrap_or(0));
            let key = ip.to_string();
            let path = self.dir.join(&key);
            if path.exists() {
                continue;
            }
            record.ip = Some(ip);
            let tmp = self.write_temporary(&to_bytes(record)?)?;
            crate::crash_point("ipam-temporary-written");
            match fs::hard_link(&tmp, &path) {
                Ok(()) => {
                    let _ = fs::remove_file(&tmp);
                    self.sync_dir()?;
                    if let Ok(t) = self.write_temporary(key.as_bytes()) {
                        let _ = fs::rename(t, self.dir.join("last"));
                    }
                    return Ok((key, ip));
                }
                Err(e) if e.kind() == ErrorKind::AlreadyExists => {
                    let _ = fs::remove_file(&tmp);
                    continue;
                }
                Err(e) => {
                    let _ = fs::remove_file(&tmp);
                    return Err(ioerr("publish", &path, e));
                }
            }
        }
        record.ip = None;
        Err(again(format!(
            "no free address in pod CIDR {subnet}: all {} usable addresses ({} to {}) are allocated; \
             delete pods on this node, run CNI GC for attachments that are gone, or give the node a larger pod CIDR",
            count,
            Ipv4Addr::from(u32::try_from(first).unwrap_or(0)),
            Ipv4Addr::from(u32::try_from(first + count - 1).unwrap_or(0)),
        )))
    }

    /// Create the record `key` (fails if it exists).
    pub fn create(&self, key: &str, record: &Record) -> Result<(), CniError> {
        let path = self.dir.join(key);
        let tmp = self.write_temporary(&to_bytes(record)?)?;
        let r = fs::hard_link(&tmp, &path);
        let _ = fs::remove_file(&tmp);
        r.map_err(|e| ioerr("publish", &path, e))?;
        self.sync_dir()
    }

    /// Replace the record `key` atomically.
    pub fn put(&self, key: &str, record: &Record) -> Result<(), CniError> {
        let path = self.dir.join(key);
        let tmp = self.write_temporary(&to_bytes(record)?)?;
        fs::rename(&tmp, &path).map_err(|e| ioerr("publish", &path, e))?;
        self.sync_dir()
    }

    /// Remove the record `key`; absent is fine.
    pub fn remove(&self, key: &str) -> Result<(), CniError> {
        let path = self.dir.join(key);
        match fs::remove_file(&path) {
            Ok(()) => self.sync_dir(),
            Err(e) if e.kind() == ErrorKind::NotFound => Ok(()),
            Err(e) => Err(ioerr("remove", &path, e)),
        }
    }
}

fn to_bytes(record: &Record) -> Result<Vec<u8>, CniError> {
    serde_json::to_vec(record).map_err(|e| io(format!("IPAM state: cannot encode record: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn rec(cid: &str) -> Record {
        Record {
            container_id: cid.into(),
            ifname: "eth0".into(),
            netns: String::new(),
            host_ifname: host_ifname(cid, "eth0"),
            state: State::Reserved,
            ip: None,
            delegate: None,
            result: None,
        }
    }

    #[test]
    fn skips_network_gateway_broadcast() {
        let c: Vec<_> = candidates("10.0.0.0/30".parse().unwrap()).collect();
        assert_eq!(c, vec![Ipv4Addr::new(10, 0, 0, 2)]);
        let c: Vec<_> = candidates("10.244.1.0/24".parse().unwrap()).collect();
        assert_eq!(c.len(), 253);
        assert_eq!(c[0], Ipv4Addr::new(10, 244, 1, 2));
        assert_eq!(c[252], Ipv4Addr::new(10, 244, 1, 254));
        assert_eq!(candidates("10.0.0.0/31".parse().unwrap()).count(), 0);
    }

    #[test]
    fn allocate_until_exhausted_then_free() {
        let d = tempfile::tempdir().unwrap();
        let s = Store::open(d.path()).unwrap();
        let subnet: Ipv4Net = "10.9.0.0/29".parse().unwrap();
        let mut got = Vec::new();
        for i in 0..5 {
            let mut r = rec(&format!("c{i}"));
            got.push(s.reserve_ip(subnet, &mut r).unwrap());
        }
        let err = s.reserve_ip(subnet, &mut rec("full")).unwrap_err();
        assert_eq!(err.code, crate::error::Code::TryAgainLater);
        assert!(err.msg.contains("10.9.0.0/29"), "{}", err.msg);
        assert_eq!(s.find("c3", "eth0").unwrap().unwrap().1.ip, Some(got[3].1));
        s.remove(&got[2].0).unwrap();
        s.remove(&got[2].0).unwrap();
        let (_, ip) = s.reserve_ip(subnet, &mut rec("again")).unwrap();
        assert_eq!(ip, got[2].1);
        assert_eq!(s.records().unwrap().len(), 5);
    }

    #[test]
    fn round_robin_and_put() {
        let d = tempfile::tempdir().unwrap();
        let s = Store::open(d.path()).unwrap();
        let subnet: Ipv4Net = "10.9.0.0/24".parse().unwrap();
        let (k1, a) = s.reserve_ip(subnet, &mut rec("a")).unwrap();
        s.remove(&k1).unwrap();
        let (k2, b) = s.reserve_ip(subnet, &mut rec("b")).unwrap();
        assert_ne!(a, b, "a freed address is not reused at once");
        let mut r = s.find("b", "eth0").unwrap().unwrap().1;
        r.state = State::Committed;
        s.put(&k2, &r).unwrap();
        assert_eq!(
            s.find("b", "eth0").unwrap().unwrap().1.state,
            State::Committed
        );
        assert!(s.create(&k2, &r).is_err());
    }

    #[test]
    fn host_names_fit() {
        let n = host_ifname("0123456789abcdef0123456789abcdef", "eth0");
        assert_eq!(n.len(), 14);
        assert_ne!(n, host_ifname("0123456789abcdef0123456789abcdef", "eth1"));
    }

    proptest! {
        #[test]
        fn candidates_stay_inside(addr in any::<u32>(), len in 0u8..=32) {
            let net = Ipv4Net::new(Ipv4Addr::from(addr), len).unwrap().trunc();
            if len <= 20 {
                for ip in candidates(net).take(4) {
                    prop_assert!(net.contains(&ip));
                    prop_assert!(ip != net.network() && ip != net.broadcast());
                }
            }
        }
    }
}
