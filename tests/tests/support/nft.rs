//! nftables rules loaded into one namespace of a test cluster for the
//! length of a test step, removed when the guard drops (also when the test
//! panics). The kernel here has no `sch_netem`: loss and cuts are rules.
use std::{
    io::Write,
    process::{Command, Stdio},
};

/// `table inet <name>`, loaded with `nft -f -`; deleted on drop.
pub struct NftTable<'a> {
    nft: Box<dyn Fn() -> Command + 'a>,
    name: String,
}

impl<'a> NftTable<'a> {
    /// Loads `chains` (the body of `table inet <name> { ... }`) with the
    /// `nft` that `nft()` builds (placed in a pod's, node's or the fabric's
    /// namespace). `place` names it in the failure message.
    pub fn load(
        nft: impl Fn() -> Command + 'a,
        name: &str,
        chains: &str,
        place: &str,
    ) -> NftTable<'a> {
        let rules = format!("table inet {name} {{\n{chains}\n}}\n");
        let mut child = nft()
            .args(["-f", "-"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("nft (installed by cargo xtask test)");
        child
            .stdin
            .take()
            .expect("piped")
            .write_all(rules.as_bytes())
            .expect("rules to nft");
        let out = child.wait_with_output().expect("nft");
        assert!(
            out.status.success(),
            "nft in {place}: {}\n{rules}",
            String::from_utf8_lossy(&out.stderr)
        );
        NftTable {
            nft: Box::new(nft),
            name: name.to_owned(),
        }
    }
}

impl Drop for NftTable<'_> {
    fn drop(&mut self) {
        let _ = (self.nft)()
            .args(["delete", "table", "inet", &self.name])
            .status();
    }
}
