//! `mesh-testapp`: the workload of the local test cluster. See `mesh_tests::testapp`.

use std::{io, process::ExitCode, time::Duration};

use anyhow::anyhow;
use clap::{Args, Parser, Subcommand};
use mesh_tests::testapp::{
    client::{self, Report},
    server,
};

#[derive(Parser)]
#[command(about = "Test workload of the mesh: servers, and clients that print one JSON report")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the servers until SIGTERM or SIGINT; prints a ready line with the bound ports.
    Serve(server::ServeArgs),
    /// Echo a byte pattern through a tcp-echo port and check it byte for byte.
    Tcp {
        #[command(flatten)]
        args: client::TcpArgs,
        #[command(flatten)]
        deadline: Deadline,
    },
    /// Hold many tcp-echo connections open at once, then echo on all of them.
    Concurrent {
        #[command(flatten)]
        args: client::ConcurrentArgs,
        #[command(flatten)]
        deadline: Deadline,
    },
    /// Measure one-byte round trips through a tcp-echo port.
    Pingpong {
        #[command(flatten)]
        args: client::PingpongArgs,
        #[command(flatten)]
        deadline: Deadline,
    },
    /// Measure throughput into a sink port.
    Bulk {
        #[command(flatten)]
        args: client::BulkArgs,
        #[command(flatten)]
        deadline: Deadline,
    },
    /// Send HTTP/1.1 or h2c requests on one connection.
    Http {
        #[command(flatten)]
        args: client::HttpArgs,
        #[command(flatten)]
        deadline: Deadline,
    },
    /// Call Whoami over one gRPC channel.
    Grpc {
        #[command(flatten)]
        args: client::GrpcArgs,
        #[command(flatten)]
        deadline: Deadline,
    },
}

#[derive(Args)]
struct Deadline {
    /// Fail instead of running longer than this.
    #[arg(long, default_value_t = 30)]
    timeout_secs: u64,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    if let Err(err) = raise_open_files_limit() {
        eprintln!("mesh-testapp: raising the open files limit: {err}");
    }
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(err) => return fail(err.into()),
    };
    runtime.block_on(run(cli.command))
}

async fn run(command: Command) -> ExitCode {
    match command {
        Command::Serve(args) => match server::serve(args).await {
            Ok(()) => ExitCode::SUCCESS,
            Err(err) => fail(err),
        },
        Command::Tcp { args, deadline } => report(deadline, client::tcp(args)).await,
        Command::Concurrent { args, deadline } => report(deadline, client::concurrent(args)).await,
        Command::Pingpong { args, deadline } => report(deadline, client::pingpong(args)).await,
        Command::Bulk { args, deadline } => report(deadline, client::bulk(args)).await,
        Command::Http { args, deadline } => report(deadline, client::http(args)).await,
        Command::Grpc { args, deadline } => report(deadline, client::grpc(args)).await,
    }
}

/// Prints the report of a client that finished, with exit status 1 if its
/// checks failed; a client that errs or overruns prints nothing on stdout.
async fn report<R: Report>(
    deadline: Deadline,
    client: impl Future<Output = anyhow::Result<R>>,
) -> ExitCode {
    let limit = Duration::from_secs(deadline.timeout_secs);
    let report = match tokio::time::timeout(limit, client).await {
        Ok(Ok(report)) => report,
        Ok(Err(err)) => return fail(err),
        Err(_) => return fail(anyhow!("timed out after {}s", deadline.timeout_secs)),
    };
    match serde_json::to_string(&report) {
        Ok(json) => println!("{json}"),
        Err(err) => return fail(err.into()),
    }
    match report.failure() {
        Some(why) => fail(anyhow!(why)),
        None => ExitCode::SUCCESS,
    }
}

fn fail(err: anyhow::Error) -> ExitCode {
    eprintln!("mesh-testapp: {err:#}");
    ExitCode::FAILURE
}

/// Lifts the soft open-files limit to the hard one: tests hold 1,000+ sockets.
fn raise_open_files_limit() -> io::Result<()> {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: `limit` is a valid, writable rlimit for the whole call.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } != 0 {
        return Err(io::Error::last_os_error());
    }
    limit.rlim_cur = limit.rlim_max;
    // SAFETY: `limit` is a valid rlimit for the whole call.
    if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &limit) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}
