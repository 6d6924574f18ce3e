//! `resnet`: classify images, evaluate on an ImageFolder tree, run tensors through a
//! network, inspect and convert checkpoints, benchmark. Argument parsing and printing
//! only; the work is in resnet-core and resnet-io.

mod bench;
mod classify;
mod common;
mod eval;
mod forward;
mod inspect;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

use common::GlobalOptions;

#[derive(Parser)]
#[command(
    name = "resnet",
    version,
    about = "ResNets on Candle: classify, evaluate, inspect, convert, benchmark"
)]
struct Cli {
    #[command(flatten)]
    global: GlobalOptions,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Classify images and print the top-k labels with probabilities.
    Classify(classify::Args),
    /// Evaluate on an ImageFolder tree: top-1, top-5, per-class accuracy, speed.
    Eval(eval::Args),
    /// Run a tensor (or a random batch) through a network.
    Forward(forward::Args),
    /// Show a checkpoint's naming scheme, architecture, parameters and validation report.
    Inspect(inspect::Args),
    /// Convert a checkpoint to torchvision (or another) naming and any dtype.
    Convert(inspect::ConvertArgs),
    /// Time inference: median and min ms per batch, images per second.
    Bench(bench::Args),
}

fn main() -> ExitCode {
    // Errors are for users: candle attaches a backtrace to its errors whenever
    // RUST_BACKTRACE is set; RUST_LIB_BACKTRACE=0 keeps them out (panics unaffected).
    if std::env::var_os("RUST_LIB_BACKTRACE").is_none() {
        std::env::set_var("RUST_LIB_BACKTRACE", "0");
    }
    // One line, no backtrace, even for a bug.
    std::panic::set_hook(Box::new(|info| {
        eprintln!("error: internal error: {info}");
    }));
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(error) => {
            use clap::error::ErrorKind;
            match error.kind() {
                ErrorKind::DisplayHelp | ErrorKind::DisplayVersion => {
                    let _ = error.print();
                    return ExitCode::SUCCESS;
                }
                ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand => {
                    let _ = error.print();
                    return ExitCode::from(2);
                }
                _ => {}
            }
            // One line: clap's own message without the usage block after it.
            let rendered = error.render().to_string();
            let line = rendered
                .lines()
                .find(|l| !l.trim().is_empty())
                .unwrap_or("error: invalid arguments");
            eprintln!("{} (see --help)", line.trim_end());
            return ExitCode::from(2);
        }
    };
    cli.global.apply_threads();
    let result = match cli.command {
        Command::Classify(args) => classify::run(&cli.global, args),
        Command::Eval(args) => eval::run(&cli.global, args),
        Command::Forward(args) => forward::run(&cli.global, args),
        Command::Inspect(args) => inspect::run(&cli.global, args),
        Command::Convert(args) => inspect::convert(&cli.global, args),
        Command::Bench(args) => bench::run(&cli.global, args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            let message = format!("{error:#}");
            eprintln!("error: {}", message.trim_end());
            ExitCode::FAILURE
        }
    }
}
