//! Enrolled pods of this node: the cgroup -> pod mapping the data path uses to
//! name a connection's source, kept in step with the kernel's ENROLLED map.
//!
//! A pod is named by (namespace, name) and bound to one cgroup: enrolling a
//! name another cgroup holds, or a cgroup another name holds, is refused, so
//! no process can take a pod's identity by enrolling under its name. With a
//! state file, enrolment is saved on every change and restored when the
//! agent starts, before it serves: a restarted agent names the same sources.
//!
//! Enrolling also guards the pod's inbound side: the agent opens its
//! plaintext listener inside the pod's network namespace and attaches the
//! `inbound` program there, so connections into the pod that the agent did
//! not open are refused or judged (see `mesh-ebpf/src/inbound.rs`).
use std::{
    collections::HashMap,
    io::Write,
    net::TcpListener,
    path::{Path, PathBuf},
    sync::{Arc, RwLock},
};

use mesh_common::MAX_POD_DEPTH;
use tracing::{info, warn};

use crate::{
    redirect::{self, Redirect, netns},
    state::PodId,
};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("field `pod`: must be a non-empty name")]
    EmptyName,
    #[error("field `namespace`: must be a non-empty name")]
    EmptyNamespace,
    #[error("field `cgroup`: {path} is not a cgroup v2 directory under {root}")]
    OutsideRoot { path: PathBuf, root: PathBuf },
    #[error("field `cgroup`: {path} is more than {MAX_POD_DEPTH} levels below {root}")]
    TooDeep { path: PathBuf, root: PathBuf },
    #[error("field `cgroup`: {path}: {source}")]
    Cgroup {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("field `pod`: {pod} is already enrolled with cgroup {cgroup}; unenroll it first")]
    NameTaken { pod: PodId, cgroup: PathBuf },
    #[error("field `cgroup`: {cgroup} is already enrolled as pod {pod}")]
    CgroupTaken { cgroup: PathBuf, pod: PodId },
    #[error("field `pod`: {0} is not enrolled")]
    NotEnrolled(PodId),
    #[error("field `netns`: {path}: {source}")]
    Netns {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(
        "field `netns`: not given, and no process of {cgroup} names one (start the pod's first process, or pass its namespace file)"
    )]
    NoNetns { cgroup: PathBuf },
    #[error("enrolment state file {path}: {source}")]
    StateFile {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(transparent)]
    Kernel(#[from] redirect::Error),
}

pub use mesh_api::admin::EnrolledPod as Pod;

/// What the inbound plaintext server is told as pods come and go.
#[derive(Debug)]
pub enum PodEvent {
    /// Serve this listener (in the pod's namespace) for the pod.
    Open {
        cgroup_id: u64,
        listener: TcpListener,
    },
    /// Stop serving the pod's listener.
    Close { cgroup_id: u64 },
}

/// Where the pods' inbound listeners go.
#[derive(Clone)]
pub struct InboundListeners {
    /// The listener port inside each pod's namespace (15006).
    pub port: u16,
    pub events: tokio::sync::mpsc::UnboundedSender<PodEvent>,
}

struct Enrolled {
    pod: Pod,
    /// Kept so the socket lives exactly as long as the enrolment (the
    /// server holds a duplicate).
    _listener: TcpListener,
}

/// Shared handle: the data path only reads it.
#[derive(Clone)]
pub struct Workloads {
    root: PathBuf,
    redirect: Arc<Redirect>,
    by_cgroup: Arc<RwLock<HashMap<u64, Enrolled>>>,
    state_file: Option<PathBuf>,
    inbound: InboundListeners,
}

impl Workloads {
    /// `state_file`: where enrolment is kept across restarts, if anywhere.
    pub fn new(
        root: PathBuf,
        redirect: Arc<Redirect>,
        state_file: Option<PathBuf>,
        inbound: InboundListeners,
    ) -> Self {
        Self {
            root,
            redirect,
            by_cgroup: Arc::default(),
            state_file,
            inbound,
        }
    }

    /// Enrolls again every pod of the state file whose cgroup still exists;
    /// returns how many.
    pub fn restore(&self) -> Result<usize, Error> {
        let Some(path) = &self.state_file else {
            return Ok(0);
        };
        let saved: Vec<Pod> = match std::fs::read(path) {
            Ok(bytes) => serde_json::from_slice(&bytes).map_err(|e| Error::StateFile {
                path: path.clone(),
                source: std::io::Error::other(e),
            })?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(0),
            Err(source) => {
                return Err(Error::StateFile {
                    path: path.clone(),
                    source,
                });
            }
        };
        let mut restored = 0;
        for pod in saved {
            match self.enroll(&pod.namespace, &pod.name, &pod.cgroup, pod.netns.as_deref()) {
                Ok(_) => restored += 1,
                Err(e) => warn!(pod = %pod.name, error = %e, "not restoring an enrolled pod"),
            }
        }
        info!(restored, "enrolment restored");
        Ok(restored)
    }

    /// Enrolls a pod: its next connect (from any process in its cgroup's
    /// subtree) is redirected, and connections into it that the agent does
    /// not open are refused or judged. Enrolling the same pod with the same
    /// cgroup again changes nothing.
    pub fn enroll(
        &self,
        namespace: &str,
        name: &str,
        cgroup: &Path,
        netns: Option<&Path>,
    ) -> Result<Pod, Error> {
        if name.trim().is_empty() {
            return Err(Error::EmptyName);
        }
        if namespace.trim().is_empty() {
            return Err(Error::EmptyNamespace);
        }
        let below = cgroup
            .strip_prefix(&self.root)
            .ok()
            .filter(|rel| rel.components().count() > 0)
            .ok_or_else(|| Error::OutsideRoot {
                path: cgroup.to_owned(),
                root: self.root.clone(),
            })?;
        if below.components().count() > MAX_POD_DEPTH as usize {
            return Err(Error::TooDeep {
                path: cgroup.to_owned(),
                root: self.root.clone(),
            });
        }
        let cgroup_id = redirect::cgroup_id(cgroup).map_err(|source| Error::Cgroup {
            path: cgroup.to_owned(),
            source,
        })?;
        let id = PodId {
            namespace: namespace.to_owned(),
            name: name.to_owned(),
        };
        let mut map = self.by_cgroup.write().unwrap_or_else(|e| e.into_inner());
        if let Some(held) = map.values().find(|e| PodId::of(&e.pod) == id) {
            if held.pod.cgroup_id != cgroup_id {
                return Err(Error::NameTaken {
                    pod: id,
                    cgroup: held.pod.cgroup.clone(),
                });
            }
            return Ok(held.pod.clone());
        }
        if let Some(other) = map.get(&cgroup_id) {
            return Err(Error::CgroupTaken {
                cgroup: cgroup.to_owned(),
                pod: PodId::of(&other.pod),
            });
        }
        let netns_path = match netns {
            Some(p) => p.to_owned(),
            None => process_netns(cgroup).ok_or_else(|| Error::NoNetns {
                cgroup: cgroup.to_owned(),
            })?,
        };
        let netns_err = |source| Error::Netns {
            path: netns_path.clone(),
            source,
        };
        let netns_file = netns::open(&netns_path).map_err(netns_err)?;
        let opened = netns::listen_in(&netns_file, self.inbound.port).map_err(netns_err)?;
        let for_server = opened.listener.try_clone().map_err(netns_err)?;
        // The listener is in place before the program that hands it
        // connections, so a PERMISSIVE pod never refuses for want of it.
        let installed = self
            .redirect
            .enroll(cgroup_id)
            .and_then(|()| {
                self.redirect
                    .set_listener(&opened.addresses, &opened.listener)
            })
            .and_then(|()| self.redirect.attach_inbound(cgroup_id, &netns_file));
        if let Err(e) = installed {
            // All or nothing: a pod half enrolled would be captured on one
            // side only.
            let _ = self.redirect.unenroll(cgroup_id);
            self.redirect.remove_listener(&opened.addresses);
            return Err(e.into());
        }
        let _ = self.inbound.events.send(PodEvent::Open {
            cgroup_id,
            listener: for_server,
        });
        let pod = Pod {
            namespace: namespace.to_owned(),
            name: name.to_owned(),
            cgroup: cgroup.to_owned(),
            cgroup_id,
            netns: netns.map(Path::to_owned),
            addresses: opened.addresses,
        };
        info!(pod = %id, addresses = ?pod.addresses, netns = %netns_path.display(), "enrolled");
        map.insert(
            cgroup_id,
            Enrolled {
                pod: pod.clone(),
                _listener: opened.listener,
            },
        );
        self.save(&map);
        Ok(pod)
    }

    pub fn unenroll(&self, namespace: &str, name: &str) -> Result<Pod, Error> {
        let id = PodId {
            namespace: namespace.to_owned(),
            name: name.to_owned(),
        };
        let mut map = self.by_cgroup.write().unwrap_or_else(|e| e.into_inner());
        let pod = map
            .values()
            .find(|e| PodId::of(&e.pod) == id)
            .map(|e| e.pod.clone())
            .ok_or(Error::NotEnrolled(id))?;
        self.redirect.unenroll(pod.cgroup_id)?;
        // Outside the mesh now: connections into it pass as they would
        // without a mesh.
        self.redirect.detach_inbound(pod.cgroup_id);
        self.redirect.remove_listener(&pod.addresses);
        let _ = self.inbound.events.send(PodEvent::Close {
            cgroup_id: pod.cgroup_id,
        });
        map.remove(&pod.cgroup_id);
        self.save(&map);
        Ok(pod)
    }

    /// The pod whose cgroup the kernel recorded for a connection.
    pub fn by_cgroup(&self, cgroup_id: u64) -> Option<PodId> {
        let map = self.by_cgroup.read().unwrap_or_else(|e| e.into_inner());
        map.get(&cgroup_id).map(|e| PodId::of(&e.pod))
    }

    pub fn list(&self) -> Vec<Pod> {
        let map = self.by_cgroup.read().unwrap_or_else(|e| e.into_inner());
        let mut pods: Vec<Pod> = map.values().map(|e| e.pod.clone()).collect();
        pods.sort_by(|a, b| (&a.namespace, &a.name).cmp(&(&b.namespace, &b.name)));
        pods
    }

    /// Writes the state file (atomically: a whole file or the previous one).
    fn save(&self, map: &HashMap<u64, Enrolled>) {
        let Some(path) = &self.state_file else {
            return;
        };
        let mut pods: Vec<&Pod> = map.values().map(|e| &e.pod).collect();
        pods.sort_by_key(|p| p.cgroup_id);
        let write = || -> std::io::Result<()> {
            if let Some(dir) = path.parent() {
                std::fs::create_dir_all(dir)?;
            }
            let tmp = path.with_extension("tmp");
            let mut f = std::fs::File::create(&tmp)?;
            f.write_all(&serde_json::to_vec(&pods).map_err(std::io::Error::other)?)?;
            f.sync_all()?;
            std::fs::rename(&tmp, path)
        };
        if let Err(e) = write() {
            warn!(path = %path.display(), error = %e, "cannot save enrolment");
        }
    }
}

/// The network namespace of a process of `cgroup`, if it has one.
fn process_netns(cgroup: &Path) -> Option<PathBuf> {
    let procs = std::fs::read_to_string(cgroup.join("cgroup.procs")).ok()?;
    let pid: u32 = procs.lines().next()?.trim().parse().ok()?;
    Some(PathBuf::from(format!("/proc/{pid}/ns/net")))
}
