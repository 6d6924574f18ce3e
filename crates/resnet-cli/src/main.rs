//! `resnet`: classify images, evaluate on an ImageFolder tree, run tensors through a
//! network, inspect and convert checkpoints, benchmark. Argument parsing and printing
//! only; the work is in resnet-core and resnet-io.

mod bench;
mod classify;
mod common;
mod eval;
mod forward;
mod inspect;
mod train;

use std::process::ExitCode;
use std::sync::LazyLock;

use clap::{CommandFactory, Parser, Subcommand};

use common::GlobalOptions;

/// `--version`: the crate version and the cargo features this binary was built with.
static VERSION: LazyLock<String> = LazyLock::new(|| {
    let features: Vec<&str> = [
        ("hub", cfg!(feature = "hub")),
        ("cuda", cfg!(feature = "cuda")),
        ("cudnn", cfg!(feature = "cudnn")),
        ("metal", cfg!(feature = "metal")),
        ("mkl", cfg!(feature = "mkl")),
        ("accelerate", cfg!(feature = "accelerate")),
    ]
    .into_iter()
    .filter_map(|(name, on)| on.then_some(name))
    .collect();
    let features = if features.is_empty() {
        "none".to_string()
    } else {
        features.join(", ")
    };
    format!(
        "{} (features: {features}; candle 0.11; {})",
        env!("CARGO_PKG_VERSION"),
        std::env::consts::ARCH
    )
});

#[derive(Parser)]
#[command(
    name = "resnet",
    version = VERSION.as_str(),
    about = "ResNets on Candle: classify, evaluate, inspect, convert, benchmark",
    after_help = "Examples:
  resnet eval --data weights/samples                 # the embedded CIFAR-10 ResNet-20
  resnet classify --model timm/resnet50.a1_in1k cat.jpg
  resnet inspect microsoft/resnet-50
  resnet forward --arch resnet101 --shape 4,3,224,224
  resnet completions bash > ~/.local/share/bash-completion/completions/resnet"
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
    #[command(after_help = "Examples:
  resnet classify weights/samples/cat/0000.jpg           # the embedded CIFAR-10 ResNet-20
  resnet classify --model timm/resnet50.a1_in1k cat.jpg dog.png
  resnet classify --model microsoft/resnet-50 --top-k 3 --json *.jpg
  resnet classify --model ./my-model-dir --labels labels.txt photo.png")]
    Classify(classify::Args),
    /// Evaluate on an ImageFolder tree: top-1, top-5, per-class accuracy, speed.
    #[command(after_help = "Examples:
  resnet eval --data weights/samples                     # the embedded CIFAR-10 ResNet-20
  resnet eval --model resnet20.safetensors --data cifar10-test --json
  resnet eval --model timm/resnet18.a1_in1k --data imagenet-val --predictions out.json")]
    Eval(eval::Args),
    /// Run a tensor (or a random batch) through a network.
    #[command(after_help = "Examples:
  resnet forward --arch resnet101 --shape 4,3,224,224    # random weights: -> [4, 1000]
  resnet forward --arch auto --model resnet50.safetensors --input x.safetensors --output y.safetensors
  resnet forward --arch auto --model timm/resnet50.a1_in1k --shape 1,3,224,224 --features")]
    Forward(forward::Args),
    /// Show a checkpoint's naming scheme, architecture, parameters and validation report.
    #[command(after_help = "Examples:
  resnet inspect resnet50.safetensors
  resnet inspect microsoft/resnet-50 --json
  resnet inspect --list                                   # every preset
  resnet inspect resnet20.safetensors --arch resnet32    # why it does not fit")]
    Inspect(inspect::Args),
    /// Convert a checkpoint to torchvision (or another) naming and any dtype.
    #[command(after_help = "Examples:
  resnet convert microsoft/resnet-50 resnet50.safetensors
  resnet convert resnet50.safetensors resnet50-f16.safetensors --dtype f16
  resnet convert resnet20.safetensors resnet20-tf.safetensors --naming transformers")]
    Convert(inspect::ConvertArgs),
    /// Time inference (or, with --train, a training step): median and min ms per batch,
    /// images per second.
    #[command(after_help = "Examples:
  resnet bench --arch resnet50 --batch 8
  resnet bench --arch resnet20 --batch 128 --threads 2 --json
  resnet bench --arch auto --model timm/resnet50.a1_in1k --dtype f16 --device cuda
  resnet bench --arch resnet20 --batch 128 --train --json  # forward, backward, SGD step")]
    Bench(bench::Args),
    /// Train or fine-tune on an ImageFolder tree (SGD or AdamW, schedules, augmentation).
    #[command(after_help = "Examples:
  resnet train --arch resnet20 --data cifar10-train --val cifar10-test --epochs 3 --output r20
  resnet train --model weights/resnet20.safetensors --data flowers --epochs 5 --freeze-backbone --lr 0.01
  resnet train --model timm/resnet50.a1_in1k --data pets --epochs 10 --optimizer adamw --lr 1e-4 --weight-decay 0.05")]
    Train(Box<train::Args>),
    /// Print a shell completion script (bash, zsh, fish, powershell, elvish).
    #[command(after_help = "Examples:
  resnet completions bash > ~/.local/share/bash-completion/completions/resnet
  resnet completions zsh > ~/.zfunc/_resnet             # with fpath+=~/.zfunc
  resnet completions fish > ~/.config/fish/completions/resnet.fish
  resnet completions powershell >> $PROFILE")]
    Completions {
        /// The shell.
        shell: clap_complete::Shell,
    },
}

/// Blocks of 256 KiB or more (activations, gradients) reused across batches and steps
/// instead of mapped and zeroed afresh: a ResNet-50 training step at batch 16 is 16%
/// faster, a ResNet-20 one at batch 128 peaks at 310 instead of 495 MB. Up to 4 GiB of
/// freed blocks kept.
#[global_allocator]
static ALLOCATOR: resnet_core::RetainingAllocator = resnet_core::RetainingAllocator::new(4 << 30);

fn main() -> ExitCode {
    // Errors are for users: candle attaches a backtrace to its errors whenever
    // RUST_BACKTRACE is set; RUST_LIB_BACKTRACE=0 keeps them out (panics unaffected).
    if std::env::var_os("RUST_LIB_BACKTRACE").is_none() {
        std::env::set_var("RUST_LIB_BACKTRACE", "0");
    }
    // Every command allocates and frees tensors of megabytes per batch: keep the memory
    // (a quarter of a training step otherwise goes to fresh mappings).
    resnet_train::reuse_freed_memory();
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
            eprintln!("{}", one_line(&error.render().to_string()));
            return ExitCode::from(2);
        }
    };
    // Ctrl-C or SIGTERM: no half-written output file is left behind.
    // `resnet train` asks to finish its step and checkpoint first (a second Ctrl-C stops).
    let _ = ctrlc::set_handler(|| {
        use std::sync::atomic::Ordering;
        if common::DEFER_INTERRUPT.load(Ordering::SeqCst)
            && !common::INTERRUPT_REQUESTED.swap(true, Ordering::SeqCst)
        {
            eprintln!("\ninterrupted: finishing the current step and writing a checkpoint (Ctrl-C again to stop now)");
            return;
        }
        resnet_io::remove_partial_outputs();
        eprintln!("error: interrupted");
        std::process::exit(130);
    });
    if let Err(error) = cli
        .global
        .apply_threads()
        .and_then(|()| common::apply_decode_memory_budget())
    {
        eprintln!("error: {}", error_line(&error));
        return ExitCode::from(2);
    }
    let result = match cli.command {
        Command::Classify(args) => classify::run(&cli.global, args),
        Command::Eval(args) => eval::run(&cli.global, args),
        Command::Forward(args) => forward::run(&cli.global, args),
        Command::Inspect(args) => inspect::run(&cli.global, args),
        Command::Convert(args) => inspect::convert(&cli.global, args),
        Command::Bench(args) => bench::run(&cli.global, args),
        Command::Train(args) => train::run(&cli.global, *args),
        Command::Completions { shell } => {
            clap_complete::generate(shell, &mut Cli::command(), "resnet", &mut std::io::stdout());
            Ok(())
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("error: {}", error_line(&error));
            ExitCode::FAILURE
        }
    }
}

/// The error and its causes in one line, each cause once: errors that already print
/// their source (an I/O error's "path: cause") are not followed by that source again.
fn error_line(error: &anyhow::Error) -> String {
    let mut message = String::new();
    for cause in error.chain() {
        let text = cause.to_string();
        let text = text.trim_end();
        if !message.ends_with(text) && !message.contains(&format!("{text}: ")) {
            if !message.is_empty() {
                message.push_str(": ");
            }
            message.push_str(text);
        }
    }
    message
}

/// clap's message on one line: every line before the usage block, the missing
/// arguments' names and the "tip" included.
fn one_line(rendered: &str) -> String {
    let parts: Vec<&str> = rendered
        .lines()
        .take_while(|l| !l.starts_with("Usage:"))
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .collect();
    let mut line = parts.join(" ");
    if line.is_empty() {
        line = "error: invalid arguments".into();
    }
    format!("{line} (see --help)")
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every line of every "Examples:" section parses as the command it shows.
    #[test]
    fn every_help_example_parses() {
        let mut command = Cli::command();
        let mut examples = Vec::new();
        let mut help_texts = vec![command.render_help().to_string()];
        command.build();
        for sub in command
            .get_subcommands_mut()
            .filter(|s| s.get_name() != "help")
        {
            let help = sub.render_help().to_string();
            assert!(
                help.contains("Examples:"),
                "{} has no examples",
                sub.get_name()
            );
            help_texts.push(help);
        }
        for help in &help_texts {
            let section = help.split("Examples:").nth(1).unwrap_or_default();
            for line in section
                .lines()
                .filter(|l| l.trim_start().starts_with("resnet "))
            {
                // Drop the comment and the shell redirection.
                let line = line.split(" #").next().unwrap_or_default();
                let line = line.split(['>', '|']).next().unwrap_or_default();
                examples.push(
                    line.split_whitespace()
                        .map(String::from)
                        .collect::<Vec<_>>(),
                );
            }
        }
        assert!(examples.len() >= 20, "{examples:?}");
        for example in examples {
            if let Err(error) = Cli::try_parse_from(&example) {
                panic!("{example:?}: {error}");
            }
        }
    }

    #[test]
    fn version_names_the_features() {
        assert!(VERSION.contains("features:"));
        assert_eq!(VERSION.contains("hub"), cfg!(feature = "hub"));
    }
}
