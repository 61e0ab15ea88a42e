use clap::Parser;

fn main() {
    if let Err(e) = run() {
        eprintln!("mesh-agent: {e:#}");
        std::process::exit(1);
    }
}

fn run() -> anyhow::Result<()> {
    mesh_api::logging::init();
    let mut argv: Vec<_> = std::env::args_os().collect();
    if argv.get(1).is_some_and(|a| a == "uninstall") {
        argv.remove(1);
        return mesh_agent::app::uninstall(&mesh_agent::app::Uninstall::parse_from(argv));
    }
    let args = mesh_agent::app::Args::parse();
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?
        .block_on(mesh_agent::app::run(args))
}
