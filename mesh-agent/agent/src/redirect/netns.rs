//! A pod's network namespace, as the agent enters it: to open the inbound
//! plaintext listener that the pod's `inbound` program hands connections to
//! (`bpf_sk_assign` only delivers to a socket of the namespace the packet is
//! in), and to read the pod's own addresses.
//!
//! Only a short-lived thread enters the namespace; a socket keeps the
//! namespace it was made in, so the listener serves from the agent's runtime
//! like any other.
use std::{
    fs, io,
    net::{Ipv4Addr, TcpListener},
    os::unix::fs::MetadataExt,
    path::Path,
};

use nix::sched::{CloneFlags, setns};

/// The agent's listener in one pod's namespace, and the pod's addresses.
#[derive(Debug)]
pub struct PodListener {
    pub listener: TcpListener,
    /// The namespace's IPv4 addresses, loopback left out.
    pub addresses: Vec<Ipv4Addr>,
}

/// Opens `netns` (a namespace file: `/run/netns/<name>`, `/proc/<pid>/ns/net`).
/// The agent's own namespace is refused: attaching there would judge the
/// agent's own listeners.
pub fn open(netns: &Path) -> io::Result<fs::File> {
    let file = fs::File::open(netns)?;
    let (theirs, ours) = (file.metadata()?, fs::metadata("/proc/self/ns/net")?);
    if (theirs.dev(), theirs.ino()) == (ours.dev(), ours.ino()) {
        return Err(io::Error::other(
            "is the agent's own network namespace, not a pod's",
        ));
    }
    Ok(file)
}

/// Binds a listener on `127.0.0.1:port` inside the namespace `netns` (the
/// inbound program steers connections to it whatever address they were
/// for) and reads the namespace's addresses.
pub fn listen_in(netns: &fs::File, port: u16) -> io::Result<PodListener> {
    std::thread::scope(|s| {
        s.spawn(|| {
            setns(netns, CloneFlags::CLONE_NEWNET).map_err(io::Error::from)?;
            let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, port))?;
            listener.set_nonblocking(true)?;
            // /proc/thread-self: this thread's namespace, not the process's.
            let fib = fs::read_to_string("/proc/thread-self/net/fib_trie")?;
            let addresses = crate::app::local_addresses(&fib)
                .into_iter()
                .filter(|ip| !ip.is_loopback())
                .collect();
            Ok(PodListener {
                listener,
                addresses,
            })
        })
        .join()
        .unwrap_or_else(|_| Err(io::Error::other("namespace thread panicked")))
    })
}
