//! Enrolled pods of this node: the cgroup -> pod mapping the data path uses to
//! name a connection's source, kept in step with the kernel's ENROLLED map.
use std::{
    collections::HashMap,
    path::{Path, PathBuf},
    sync::{Arc, RwLock},
};

use crate::redirect::{self, Redirect};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("field `pod`: must be a non-empty name")]
    EmptyName,
    #[error("field `cgroup`: {path} is not a cgroup v2 directory under {root}")]
    OutsideRoot { path: PathBuf, root: PathBuf },
    #[error("field `cgroup`: {path}: {source}")]
    Cgroup {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("field `pod`: {0} is not enrolled")]
    NotEnrolled(String),
    #[error(transparent)]
    Kernel(#[from] redirect::Error),
}

pub use mesh_api::admin::EnrolledPod as Pod;

/// Shared handle: the data path only reads it.
#[derive(Clone)]
pub struct Workloads {
    root: PathBuf,
    redirect: Arc<Redirect>,
    by_cgroup: Arc<RwLock<HashMap<u64, Pod>>>,
}

impl Workloads {
    pub fn new(root: PathBuf, redirect: Arc<Redirect>) -> Self {
        Self {
            root,
            redirect,
            by_cgroup: Arc::default(),
        }
    }

    /// Enrolls a pod: its next connect is redirected. Re-enrolling under a new
    /// cgroup replaces the old one.
    pub fn enroll(&self, name: &str, cgroup: &Path) -> Result<Pod, Error> {
        if name.trim().is_empty() {
            return Err(Error::EmptyName);
        }
        if !cgroup.starts_with(&self.root) || cgroup == self.root {
            return Err(Error::OutsideRoot {
                path: cgroup.to_owned(),
                root: self.root.clone(),
            });
        }
        let cgroup_id = redirect::cgroup_id(cgroup).map_err(|source| Error::Cgroup {
            path: cgroup.to_owned(),
            source,
        })?;
        let pod = Pod {
            name: name.to_owned(),
            cgroup: cgroup.to_owned(),
            cgroup_id,
        };
        let mut map = self.by_cgroup.write().unwrap_or_else(|e| e.into_inner());
        if let Some(old) = map.values().find(|p| p.name == name).cloned()
            && old.cgroup_id != cgroup_id
        {
            self.redirect.unenroll(old.cgroup_id)?;
            map.remove(&old.cgroup_id);
        }
        self.redirect.enroll(cgroup_id)?;
        map.insert(cgroup_id, pod.clone());
        Ok(pod)
    }

    pub fn unenroll(&self, name: &str) -> Result<Pod, Error> {
        let mut map = self.by_cgroup.write().unwrap_or_else(|e| e.into_inner());
        let pod = map
            .values()
            .find(|p| p.name == name)
            .cloned()
            .ok_or_else(|| Error::NotEnrolled(name.to_owned()))?;
        self.redirect.unenroll(pod.cgroup_id)?;
        map.remove(&pod.cgroup_id);
        Ok(pod)
    }

    pub fn by_cgroup(&self, cgroup_id: u64) -> Option<String> {
        let map = self.by_cgroup.read().unwrap_or_else(|e| e.into_inner());
        map.get(&cgroup_id).map(|p| p.name.clone())
    }

    pub fn list(&self) -> Vec<Pod> {
        let map = self.by_cgroup.read().unwrap_or_else(|e| e.into_inner());
        let mut pods: Vec<Pod> = map.values().cloned().collect();
        pods.sort_by(|a, b| a.name.cmp(&b.name));
        pods
    }
}
