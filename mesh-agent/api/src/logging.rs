//! Logging set-up of the binaries.

/// Logs to stderr (`RUST_LOG`, default info); colours only on a terminal, so
/// log files stay plain.
pub fn init() {
    use std::io::IsTerminal;
    tracing_subscriber::fmt()
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .init();
}
