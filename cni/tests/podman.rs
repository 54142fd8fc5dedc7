//! A real runtime: Debian's podman (4.3, CNI network backend) runs two containers from a local
//! busybox rootfs on a Sluice network (sluice-cni + portmap). They get addresses from Sluice,
//! reach each other, `-p` works through portmap, and removing them frees everything.
//!
//! Podman runs inside a dedicated host network namespace (entered with `nsenter --net`, which
//! keeps the mount namespace and so the cgroup mounts) with its own storage in a temp dir.
//! This machine needs `--runtime runc` (crun refuses hybrid cgroups), `--cgroup-manager cgroupfs`
//! and lowered ulimits (no CAP_SYS_RESOURCE to raise them).

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use common::*;

struct Podman {
    host: Netns,
    dir: tempfile::TempDir,
}

impl Podman {
    fn cmd(&self, args: &[&str]) -> std::process::Output {
        let d = self.dir.path();
        let mut c = Command::new("timeout");
        c.arg("120")
            .arg("nsenter")
            .arg(format!("--net={}", self.host.path()))
            .arg("podman")
            .arg("--root")
            .arg(d.join("root"))
            .arg("--runroot")
            .arg(d.join("runroot"))
            .args(["--network-backend", "cni", "--cni-config-dir"])
            .arg(d.join("net.d"))
            .args([
                "--runtime",
                "runc",
                "--cgroup-manager",
                "cgroupfs",
                "--events-backend",
                "file",
            ])
            .args(args)
            .env("CONTAINERS_CONF", d.join("containers.conf"));
        c.output().expect("run podman")
    }

    fn ok(&self, args: &[&str]) -> String {
        let out = self.cmd(args);
        assert!(
            out.status.success(),
            "podman {args:?} failed: {}\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }
}

impl Drop for Podman {
    fn drop(&mut self) {
        let _ = self.cmd(&["rm", "-af", "-t", "0"]);
        // Unmount anything podman left under the temp dir before it is removed.
        let root = self.dir.path().display().to_string();
        if let Ok(m) = std::fs::read_to_string("/proc/self/mounts") {
            let mut points: Vec<&str> = m
                .lines()
                .filter_map(|l| l.split(' ').nth(1))
                .filter(|p| p.starts_with(&root))
                .collect();
            points.sort_by_key(|p| std::cmp::Reverse(p.len()));
            for p in points {
                let _ = Command::new("umount").args(["-l", p]).status();
            }
        }
    }
}

fn rootfs(dir: &Path) -> PathBuf {
    let r = dir.join("rootfs");
    for d in ["bin", "proc", "sys", "dev", "etc", "tmp"] {
        std::fs::create_dir_all(r.join(d)).unwrap();
    }
    std::fs::copy("/bin/busybox", r.join("bin/busybox"))
        .expect("busybox-static is needed (apt install busybox-static)");
    for applet in ["sh", "ip", "ping", "nc", "cat", "sleep", "echo"] {
        std::os::unix::fs::symlink("busybox", r.join("bin").join(applet)).unwrap();
    }
    r
}

#[test]
fn podman_containers_on_sluice() {
    if !require_root("podman_containers_on_sluice") {
        return;
    }
    for tool in ["podman", "runc", "nsenter"] {
        let found = Command::new("sh")
            .args(["-c", &format!("command -v {tool}")])
            .output()
            .unwrap()
            .status
            .success();
        assert!(
            found,
            "{tool} is needed for the podman test (apt install podman runc)"
        );
    }
    let pm = Podman {
        host: Netns::new("podman-h"),
        dir: tempfile::tempdir().unwrap(),
    };
    let d = pm.dir.path();
    let net = format!("slc-podman-{}", std::process::id());
    let ipam = d.join("ipam");
    std::fs::create_dir_all(d.join("net.d")).unwrap();
    let conflist = serde_json::json!({
        "cniVersion": "1.0.0", "name": net,
        "plugins": [
            { "type": "sluice-cni", "agent": false, "clusterCidr": "10.254.0.0/16",
              "ipam": { "subnet": "10.254.1.0/24", "dataDir": ipam } },
            { "type": "portmap", "capabilities": { "portMappings": true } }
        ]
    });
    std::fs::write(d.join("net.d/slc.conflist"), conflist.to_string()).unwrap();
    let bin_dir = Path::new(BIN).parent().unwrap().display().to_string();
    std::fs::write(
        d.join("containers.conf"),
        format!("[network]\nnetwork_backend = \"cni\"\ncni_plugin_dirs = [\"{bin_dir}\", \"{UPSTREAM}\"]\n"),
    )
    .unwrap();
    let rootfs = rootfs(d).display().to_string();
    pm.host.run(&["ip", "link", "set", "lo", "up"]);
    pm.host
        .run(&["ip", "addr", "add", "192.0.2.1/32", "dev", "lo"]);
    pm.host.run(&["sysctl", "-qw", "net.ipv4.ip_forward=1"]);

    let limits = [
        "--ulimit",
        "nofile=4096:4096",
        "--ulimit",
        "nproc=4096:4096",
    ];
    let a = format!("slc-a-{}", std::process::id());
    let b = format!("slc-b-{}", std::process::id());
    let mut run_a = vec![
        "run",
        "-d",
        "--name",
        &a,
        "--network",
        &net,
        "-p",
        "8080:80",
    ];
    run_a.extend(limits);
    run_a.extend([
        "--rootfs",
        &rootfs,
        "/bin/sh",
        "-c",
        "while true; do echo via-podman | nc -l -p 80; done",
    ]);
    pm.ok(&run_a);
    let fmt = format!("{{{{(index .NetworkSettings.Networks \"{net}\").IPAddress}}}}");
    let ip_a = pm.ok(&["inspect", &a, "--format", &fmt]).trim().to_string();
    assert!(
        ip_a.starts_with("10.254.1."),
        "container A address {ip_a:?}"
    );

    let script = format!(
        "ip -4 -o addr show eth0; ping -c 2 -W 5 {ip_a} >/dev/null && echo PING-OK; nc 192.0.2.1 8080 </dev/null"
    );
    let mut run_b = vec!["run", "--rm", "--name", &b, "--network", &net];
    run_b.extend(limits);
    run_b.extend(["--rootfs", &rootfs, "/bin/sh", "-c", &script]);
    let out = pm.ok(&run_b);
    assert!(out.contains("inet 10.254.1."), "container B address: {out}");
    assert!(
        out.contains("PING-OK"),
        "B could not ping A ({ip_a}): {out}"
    );
    assert!(
        out.contains("via-podman"),
        "port 8080 did not reach A through portmap: {out}"
    );

    // Only A is left allocated; removing it frees everything.
    let records = |p: &Path| -> Vec<String> {
        std::fs::read_dir(p.join(&net))
            .map(|rd| {
                rd.filter_map(|e| e.ok())
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .filter(|n| n != "lock" && n != "last")
                    .collect()
            })
            .unwrap_or_default()
    };
    assert_eq!(records(&ipam), vec![ip_a.clone()]);
    pm.ok(&["rm", "-f", "-t", "0", &a]);
    assert!(records(&ipam).is_empty(), "{:?}", records(&ipam));
    assert!(
        pm.host.links().iter().all(|l| !l.starts_with("sl")),
        "{:?}",
        pm.host.links()
    );
    assert!(
        !pm.host
            .run(&["iptables", "-t", "nat", "-S"])
            .contains("--dport 8080")
    );
}
