//! `sluicectl` end to end against a real `sluice-control` over TLS.

mod common;

use std::io::Write;
use std::process::{Command, Output, Stdio};

use common::*;

struct Ctl {
    server: String,
    ca: String,
}

impl Ctl {
    fn cmd(&self, token: &str) -> Command {
        let mut c = Command::new(env!("CARGO_BIN_EXE_sluicectl"));
        c.env_clear()
            .env("SLUICE_SERVER", &self.server)
            .env("SLUICE_CA", &self.ca)
            .env("SLUICE_TOKEN", token);
        c
    }
    fn run(&self, args: &[&str]) -> Output {
        self.cmd(OPERATOR_TOKEN).args(args).output().unwrap()
    }
    fn ok(&self, args: &[&str]) -> String {
        let out = self.run(args);
        assert!(
            out.status.success(),
            "sluicectl {args:?} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    }
    fn fails(&self, args: &[&str]) -> String {
        let out = self.run(args);
        assert!(!out.status.success(), "sluicectl {args:?} should fail");
        String::from_utf8(out.stderr).unwrap()
    }
}

const EXAMPLES: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/examples/manifests");

#[test]
fn apply_get_delete_status() {
    let certs = Certs::generate();
    let mode = Mode::Tls(certs.dir.path().to_path_buf());
    let data = tempfile::tempdir().unwrap();
    let server = Server::start(
        &mode,
        "127.0.0.1:0",
        &["--data-dir".into(), data.path().display().to_string()],
    );
    let ctl = Ctl {
        server: format!("https://{}", server.addr),
        ca: certs.path("ca.pem").display().to_string(),
    };

    let out = ctl.ok(&["apply", "-f", EXAMPLES]);
    assert!(out.contains("Service demo/web applied"), "{out}");
    assert!(
        out.contains("NetworkPolicy demo/web-allow-clients applied"),
        "{out}"
    );

    let table = ctl.ok(&["get", "svc", "-n", "demo"]);
    assert!(table.lines().next().unwrap().starts_with("KIND"), "{table}");
    assert!(
        table.contains("clusterIP=10.96.0.1") && table.contains("80:30000/TCP"),
        "{table}"
    );

    let json: serde_json::Value =
        serde_json::from_str(&ctl.ok(&["get", "service", "web", "-n", "demo", "-o", "json"]))
            .unwrap();
    assert_eq!(json["spec"]["clusterIP"], "10.96.0.1");
    assert_eq!(json["spec"]["ports"][0]["nodePort"], 30000);
    let yaml = ctl.ok(&["get", "netpol", "-A", "-o", "yaml"]);
    assert!(
        yaml.contains("web-allow-clients") && yaml.contains("role: client"),
        "{yaml}"
    );
    // What `get -o yaml` prints is a manifest `apply` accepts again.
    let one = ctl.ok(&["get", "eps", "web-1", "-n", "demo", "-o", "yaml"]);
    let mut child = ctl
        .cmd(OPERATOR_TOKEN)
        .args(["apply", "-f", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(one.as_bytes())
        .unwrap();
    assert!(child.wait_with_output().unwrap().status.success());

    // A bad document rejects the whole apply: the error names file, document and field, and the
    // good documents before it are not applied.
    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("bad.yaml");
    std::fs::write(
        &bad,
        "apiVersion: v1\nkind: Namespace\nmetadata: {name: fresh}\n---\napiVersion: v1\nkind: Service\nmetadata: {name: broken, namespace: fresh}\nspec:\n  ports:\n  - port: 99999\n",
    )
    .unwrap();
    let err = ctl.fails(&["apply", "-f", bad.to_str().unwrap()]);
    assert!(
        err.contains("bad.yaml: document 2") && err.contains("spec.ports[0].port"),
        "{err}"
    );
    assert!(
        !ctl.ok(&["get", "ns"]).contains("fresh"),
        "nothing of a rejected apply is applied"
    );
    std::fs::write(
        &bad,
        "apiVersion: apps/v1\nkind: Deployment\nmetadata: {name: d}\n",
    )
    .unwrap();
    let err = ctl.fails(&["apply", "-f", bad.to_str().unwrap()]);
    assert!(
        err.contains("document 1") && err.contains("Deployment"),
        "{err}"
    );
    // A ClusterIP taken by another Service is refused by the server, atomically too.
    std::fs::write(
        &bad,
        "apiVersion: v1\nkind: Namespace\nmetadata: {name: fresh}\n---\napiVersion: v1\nkind: Service\nmetadata: {name: clash, namespace: demo}\nspec: {clusterIP: 10.96.0.1, ports: [{port: 81}]}\n",
    )
    .unwrap();
    let err = ctl.fails(&["apply", "-f", bad.to_str().unwrap()]);
    assert!(
        err.contains("10.96.0.1 is allocated to Service demo/web"),
        "{err}"
    );
    assert!(!ctl.ok(&["get", "ns"]).contains("fresh"));

    // A node token cannot apply.
    let out = ctl
        .cmd(NODE_A_TOKEN)
        .args(["apply", "-f", EXAMPLES])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("operator token required"));

    // Nodes and status.
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let c = sluice_control::client::ControlClient::connect(
            &server.config(&mode, Some(NODE_A_TOKEN)),
        )
        .await
        .unwrap();
        c.register_node(
            "node-a",
            "192.168.7.1".parse().unwrap(),
            [2, 0, 0, 0, 0, 0xa],
        )
        .await
        .unwrap();
        c.report_sync("node-a", 3).await.unwrap();
    });
    let nodes = ctl.ok(&["nodes"]);
    assert!(
        nodes.contains("node-a")
            && nodes.contains("10.244.1.0/24")
            && nodes.contains("02:00:00:00:00:0a"),
        "{nodes}"
    );
    let status = ctl.ok(&["status"]);
    assert!(
        status.contains("store redb") && status.contains("node-a"),
        "{status}"
    );
    let status: serde_json::Value =
        serde_json::from_str(&ctl.ok(&["status", "-o", "json"])).unwrap();
    assert_eq!(status["agents"][0]["syncedRevision"], 3);

    // Delete by name and by file; the ClusterIP goes back to the pool.
    assert!(
        ctl.ok(&["delete", "svc", "web", "-n", "demo"])
            .contains("1 of 1 deleted")
    );
    assert!(
        ctl.ok(&["delete", "-f", &format!("{EXAMPLES}/20-policy.yaml")])
            .contains("1 of 1 deleted")
    );
    assert!(
        ctl.fails(&["get", "svc", "web", "-n", "demo"])
            .contains("not found")
    );
    ctl.ok(&["apply", "-f", &format!("{EXAMPLES}/10-service.yaml")]);
    assert!(
        ctl.ok(&["get", "svc", "-n", "demo"])
            .contains("clusterIP=10.96.0.1")
    );
    // Deleting the namespace takes its objects and frees the ClusterIP.
    assert!(ctl.ok(&["delete", "ns", "demo"]).contains("1 of 1 deleted"));
    assert!(!ctl.ok(&["get", "all", "-A"]).contains("demo"));
    ctl.ok(&[
        "apply",
        "-f",
        &format!("{EXAMPLES}/00-namespace.yaml"),
        "-f",
        &format!("{EXAMPLES}/10-service.yaml"),
    ]);
    assert!(
        ctl.ok(&["get", "svc", "-n", "demo"])
            .contains("clusterIP=10.96.0.1")
    );
    assert!(
        ctl.ok(&["delete", "node", "node-a"])
            .contains("1 of 1 deleted")
    );
    assert!(!ctl.ok(&["nodes"]).contains("node-a"));
}

#[test]
fn help_and_completion() {
    let ctl = Ctl {
        server: "https://127.0.0.1:1".into(),
        ca: "/nonexistent".into(),
    };
    for sub in [
        &[][..],
        &["apply"],
        &["get"],
        &["delete"],
        &["nodes"],
        &["status"],
        &["completion"],
    ] {
        let mut args: Vec<&str> = sub.to_vec();
        args.push("--help");
        let out = ctl.ok(&args);
        assert!(
            out.contains("Examples:"),
            "sluicectl {args:?} has no examples: {out}"
        );
    }
    let bash = ctl.ok(&["completion", "bash"]);
    assert!(
        bash.contains("sluicectl") && bash.contains("complete"),
        "{bash}"
    );
    ctl.ok(&["completion", "zsh"]);
    // Validation needs no server.
    assert!(
        ctl.ok(&["apply", "--dry-run", "-f", EXAMPLES])
            .contains("NetworkPolicy demo/web-allow-clients validated")
    );
    let err = ctl.fails(&["get", "deployments"]);
    assert!(err.contains("unknown kind"), "{err}");
}
