use clap::Parser;

fn main() {
    if let Err(e) = mesh_agent::cli::run(mesh_agent::cli::Args::parse()) {
        eprintln!("meshctl: {e:#}");
        std::process::exit(1);
    }
}
