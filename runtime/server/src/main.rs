//! `hearth`: the server (`hearth serve`) and the client CLI, in one binary.
//!
//! Reading order for a newcomer: [`serve`] wires the runtime together
//! (store → auth → engine → registry → HTTP); the client verbs in [`cli`] are
//! thin wrappers over the `hearth-client` SDK.

mod cli;
mod listen;
mod serve;

use std::path::PathBuf;

use clap::{Parser, Subcommand};

/// mimalloc instead of glibc's malloc: an invocation allocates and frees
/// many small objects across threads (request parts, wasi-http resources,
/// usage records), and glibc's spent ~7 % of a warm request's CPU on it.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Hearth: serverless WebAssembly functions for ML inference.
#[derive(Debug, Parser)]
#[command(name = "hearth", version, about, long_about = None, propagate_version = true)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

/// Where client verbs connect, and as whom.
#[derive(Debug, clap::Args)]
struct ClientArgs {
    /// Server URL.
    #[arg(long, env = "HEARTH_URL", default_value = "http://127.0.0.1:8080", global = true)]
    server: String,
    /// Bearer token (the admin token in `admin-token` of the data directory after the first start, or one from `hearth tokens create`).
    #[arg(long, env = "HEARTH_TOKEN", hide_env_values = true, global = true)]
    token: Option<String>,
    /// Tenant to act in.
    #[arg(long, env = "HEARTH_TENANT", default_value = "default", global = true)]
    tenant: String,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the server.
    Serve(Box<serve::ServeArgs>),
    /// Build (if the manifest says how) and deploy a function as its next version.
    Deploy {
        /// Project directory holding hearth.toml, or the manifest file itself.
        #[arg(default_value = ".")]
        path: PathBuf,
        /// Do not run the manifest's `build` command.
        #[arg(long)]
        no_build: bool,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Call a function and print its response body.
    Invoke(cli::InvokeArgs),
    /// List, show or delete deployed functions.
    Functions {
        #[command(subcommand)]
        command: cli::FunctionsCommand,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Point aliases at versions (`NAME@ALIAS`), split or mirror their
    /// traffic, and read their history.
    Alias {
        #[command(subcommand)]
        command: cli::AliasCommand,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Point an alias (default `latest`, the bare name) back at its
    /// previous target.
    Rollback {
        /// Function name.
        name: String,
        /// Alias.
        #[arg(default_value = "latest")]
        alias: String,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Create, list or revoke bearer tokens (needs an admin token).
    Tokens {
        #[command(subcommand)]
        command: cli::TokensCommand,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Export usage records or show totals (needs a billing or admin token).
    Usage {
        #[command(subcommand)]
        command: cli::UsageCommand,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Parse an ONNX model as a deploy does and exit: 0 when it is valid,
    /// 2 (the reason on stderr) when not. The server runs it in a bounded
    /// child process on each new model.
    #[command(hide = true)]
    CheckModel {
        /// The ONNX file.
        path: PathBuf,
    },
    /// Show devices, warm models and the models each function names.
    Status {
        /// Output format.
        #[arg(long, short, value_enum, default_value_t)]
        output: cli::Output,
        #[command(flatten)]
        client: ClientArgs,
    },
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    // No async runtime for the model check: it runs under a tight address
    // space limit, and worker threads would take part of it.
    if let Command::CheckModel { path } = &cli.command {
        return check_model(path);
    }
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(runtime) => runtime,
        Err(err) => {
            eprintln!("error: cannot start the async runtime: {err}");
            return std::process::ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(async move {
        match cli.command {
            Command::Serve(args) => serve::run(*args).await,
            Command::Deploy { path, no_build, client } => cli::deploy(&client, &path, no_build).await,
            Command::Invoke(args) => cli::invoke(args).await,
            Command::Functions { command, client } => cli::functions(&client, command).await,
            Command::Status { output, client } => cli::status(&client, output).await,
            Command::Usage { command, client } => cli::usage(&client, command).await,
            Command::Tokens { command, client } => cli::tokens(&client, command).await,
            Command::Alias { command, client } => cli::alias(&client, command).await,
            Command::Rollback { name, alias, client } => cli::rollback(&client, &name, &alias).await,
            Command::CheckModel { .. } => unreachable!("handled before the runtime starts"),
        }
    });
    match result {
        Ok(code) => code,
        Err(err) => {
            eprintln!("error: {err:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

/// `hearth check-model PATH`: parses and prepares the model on the CPU.
fn check_model(path: &std::path::Path) -> std::process::ExitCode {
    let invalid = std::process::ExitCode::from(hearth_registry::INVALID_MODEL_EXIT as u8);
    let bytes = match std::fs::read(path) {
        Ok(bytes) => bytes,
        Err(err) => {
            eprintln!("error: reading {}: {err}", path.display());
            return invalid;
        }
    };
    match hearth_devices::DevicePool::cpu_only().cpu().prepare(&bytes) {
        Ok(_) => std::process::ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("error: {err}");
            invalid
        }
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_command_line_is_well_formed() {
        // clap checks names and flags only when a command is built: every
        // subcommand here, not just the ones a test happens to run.
        <super::Cli as clap::CommandFactory>::command().debug_assert();
    }
}
