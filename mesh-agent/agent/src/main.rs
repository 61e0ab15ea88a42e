use clap::Parser;

fn main() {
    if let Err(e) = run() {
        eprintln!("mesh-agent: {e:#}");
        std::process::exit(1);
    }
}

fn run() -> anyhow::Result<()> {
    mesh_api::logging::init();
    let args = mesh_agent::app::Args::parse();
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?
        .block_on(mesh_agent::app::run(args))
}
