//! `meshctl`: the operator CLI.
mod ca;
mod cli;
mod node;
mod tap;
mod top;

use clap::Parser;

fn main() {
    if let Err(e) = cli::run(cli::Args::parse()) {
        eprintln!("meshctl: {e:#}");
        std::process::exit(1);
    }
}
