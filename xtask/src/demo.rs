//! `cargo xtask demo`: a 2-node cluster with traffic through the agents, and
//! what they carried.
use std::{
    fs::File,
    process::{Command, Stdio},
};

use anyhow::{Context, bail};

use crate::{
    cluster::{self, Cluster, ClusterSpec},
    deps,
};

pub fn run() -> anyhow::Result<()> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        bail!("the demo attaches eBPF programs and creates network namespaces: run it as root");
    }
    deps::prepare_cluster()?;
    cluster::sweep(false)?;
    let mut cluster = Cluster::up(&ClusterSpec::default())?;
    cluster.keep();
    cluster.set_current()?;
    let testapp = cluster::target_dir().join("release/mesh-testapp");
    let meshctl = cluster::target_dir().join("release/meshctl");

    println!(
        "\n== cluster {} is up: 2 nodes, 2 pods each, all enrolled",
        cluster.prefix()
    );
    for pod in cluster.pods() {
        println!("   {:<12} {:<14} on {}", pod.name, pod.ip, pod.node);
    }
    for server in ["node2-pod1", "node1-pod2"] {
        let info = cluster.pod(server);
        let log = File::create(&info.log)?;
        cluster
            .command(server, &testapp)
            .args([
                "serve",
                "--name",
                server,
                "--tcp-echo",
                "7000",
                "--http",
                "8080",
            ])
            .stdout(log.try_clone()?)
            .stderr(log)
            .stdin(Stdio::null())
            .spawn()
            .with_context(|| format!("starting the test server in {server}"))?;
    }
    std::thread::sleep(std::time::Duration::from_millis(300));

    // Two Services through the control plane: pods call them by VIP.
    let services = ["node2-pod1", "node1-pod2"]
        .iter()
        .enumerate()
        .map(|(i, pod)| {
            format!(
                "apiVersion: mesh.dev/v1alpha1\nkind: Service\nmetadata: {{name: echo-{}, namespace: default}}\nspec:\n  vips: [198.18.100.{}]\n  ports: [{{name: tcp, port: 80, targetPort: 7000}}]\n  selector: {{app: {pod}}}\n",
                i + 1,
                i + 1
            )
        })
        .collect::<Vec<_>>()
        .join("---\n");
    println!(
        "\n== meshctl apply: Services echo-1 (198.18.100.1:80 -> node2-pod1) and echo-2 (198.18.100.2:80 -> node1-pod2)"
    );
    print!("{}", cluster.apply(&services)?);
    std::thread::sleep(std::time::Duration::from_millis(300));
    let cross = format!("{}:7000", cluster.pod("node2-pod1").ip);
    let same = format!("{}:7000", cluster.pod("node1-pod2").ip);
    let http = format!("http://{}:8080/", cluster.pod("node2-pod1").ip);
    let calls: [(&str, Vec<&str>); 4] = [
        (
            "Service echo-1 by VIP (cross-node, mTLS tunnel)",
            vec!["tcp", "--addr", "198.18.100.1:80", "--bytes", "100000"],
        ),
        (
            "cross-node TCP, 10 MB each way",
            vec!["tcp", "--addr", &cross, "--bytes", "10000000"],
        ),
        (
            "same-node TCP, 1 MB each way",
            vec!["tcp", "--addr", &same, "--bytes", "1000000"],
        ),
        (
            "cross-node HTTP/1.1, 100 requests",
            vec!["http", "--url", &http, "--count", "100"],
        ),
    ];
    for (what, args) in calls {
        let out = cluster
            .command("node1-pod1", &testapp)
            .args(&args)
            .output()?;
        println!("\n== node1-pod1 -> {what}");
        println!("   {}", String::from_utf8_lossy(&out.stdout).trim());
        if !out.status.success() {
            bail!("{what} failed: {}", String::from_utf8_lossy(&out.stderr));
        }
    }

    let admin = cluster.node("node1").admin_socket.clone();
    for sub in ["status", "connections"] {
        println!("\n== meshctl {sub} (node1's agent)");
        let out = Command::new(&meshctl)
            .arg("--admin")
            .arg(&admin)
            .arg(sub)
            .output()?;
        print!("{}", String::from_utf8_lossy(&out.stdout));
    }
    println!("\n== meshctl agents (the control server's view of every agent)");
    let out = cluster.meshctl(&["agents"])?;
    print!("{}", String::from_utf8_lossy(&out.stdout));
    println!(
        "\n== look around
   cargo xtask cluster status
   cargo xtask cluster exec node1-pod1 -- {testapp} tcp --addr {cross}
   {meshctl} --admin {admin} connections
   curl is in each node: cargo xtask cluster exec node1-pod1 -- curl -s http://198.19.1.1:15020/metrics
== tear down
   cargo xtask cluster down",
        testapp = testapp.display(),
        meshctl = meshctl.display(),
        admin = admin.display(),
    );
    Ok(())
}
