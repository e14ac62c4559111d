//! The `kiln` command line: serve models, manage the registry, fit GLMs.

mod builtin;
mod commands;
mod resolve;

use std::path::PathBuf;

use anyhow::Result;
use clap::{Parser, Subcommand};

/// One binary that serves generative and classical models over the protocols
/// clients already speak.
#[derive(Parser)]
#[command(name = "kiln", version, about)]
struct Cli {
    /// Data directory holding the registry (default: $KILN_HOME, else ~/.local/share/kiln).
    #[arg(long, global = true, env = "KILN_HOME")]
    home: Option<PathBuf>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Serve models over HTTP (MLflow/SageMaker, KServe, RunPod, Cog, OpenAI).
    Serve(commands::serve::ServeArgs),
    /// Run models' jobs from a shared queue (`--queue redis://...`) that
    /// `kiln serve --queue` fronts accept; serves only probes and metrics.
    Worker(commands::serve::ServeArgs),
    /// Manage the model registry.
    #[command(subcommand)]
    Models(commands::models::ModelsCommand),
    /// Generalized linear models.
    #[command(subcommand)]
    Glm(commands::glm::GlmCommand),
    /// Run a model once (`-i key=value`, `-o out.png`, or `--data rows.csv`).
    Predict(commands::predict::PredictArgs),
    /// Chat with an LLM in the terminal.
    Chat(commands::generate::ChatArgs),
    /// Compare an LLM's logits with a reference dump (MAX-style verification).
    Verify(commands::verify::VerifyArgs),
    /// Time pipelines for the comparison scripts in bench/.
    #[command(subcommand)]
    Bench(commands::bench::BenchCommand),
}

fn init_logging() {
    let filter = std::env::var("KILN_LOG")
        .ok()
        .and_then(|spec| spec.parse::<tracing_subscriber::filter::Targets>().ok())
        .unwrap_or_else(|| {
            tracing_subscriber::filter::Targets::new().with_default(tracing::Level::INFO)
        });
    use tracing_subscriber::layer::SubscriberExt;
    use tracing_subscriber::util::SubscriberInitExt;
    tracing_subscriber::registry()
        .with(
            tracing_subscriber::fmt::layer()
                .with_writer(std::io::stderr)
                .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr())),
        )
        .with(filter)
        .init();
}

fn main() -> Result<()> {
    let threads = kiln_engine::threads::settle_thread_count();
    let allocator = kiln_engine::memory::tune_allocator();
    let cli = Cli::parse();
    init_logging();
    tracing::debug!(
        ?allocator,
        ?threads,
        "malloc and thread settings for tensor work"
    );
    let home = cli.home.unwrap_or_else(kiln_registry::default_home);
    match cli.command {
        Command::Serve(args) => commands::serve::run(&home, args),
        Command::Worker(args) => commands::serve::run_worker(&home, args),
        Command::Models(command) => commands::models::run(&home, command),
        Command::Glm(command) => commands::glm::run(&home, command),
        Command::Predict(args) => commands::predict::run(&home, args),
        Command::Chat(args) => commands::generate::chat(&home, args),
        Command::Verify(args) => commands::verify::run(args),
        Command::Bench(command) => commands::bench::run(command),
    }
}
