//! `mesh-crds write|check DIR`: what `cargo xtask crds` runs.
use std::process::ExitCode;

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match mesh_crds::main_with(&args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("mesh-crds: {e:#}");
            ExitCode::FAILURE
        }
    }
}
