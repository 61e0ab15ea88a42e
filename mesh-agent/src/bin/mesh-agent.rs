use clap::Parser;

fn main() {
    if let Err(e) = run() {
        eprintln!("mesh-agent: {e:#}");
        std::process::exit(1);
    }
}

fn run() -> anyhow::Result<()> {
    use std::io::IsTerminal;
    tracing_subscriber::fmt()
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .init();
    let args = mesh_agent::agent::Args::parse();
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?
        .block_on(mesh_agent::agent::run(args))
}
