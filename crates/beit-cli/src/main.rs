//! The `beit` command. Thin: argument parsing and file formats here, everything else in the `beit` library.

mod bench;
mod classify;
mod common;
mod convert;
mod embed;
mod forward;
mod mim;
mod preprocess;
mod pretrain;
mod segment;
mod train;
mod training;
mod serve;
mod tokenize;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "beit", version, about = "BEiT image models from the command line, output-for-output with transformers")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Classify images: top-k labels with scores.
    Classify(classify::ClassifyArgs),
    /// Time the forward pass: images/s, peak RSS, load time and share of the sgemm ceiling (--json for scripts).
    Bench(bench::BenchArgs),
    /// Segment images: class-id PNGs, colour overlays with a legend, and per-class pixel shares.
    Segment(segment::SegmentArgs),
    /// Embed images: pooled vectors (or every token) as .npy or .safetensors.
    Embed(embed::EmbedArgs),
    /// Predict the visual tokens of masked patches with a masked-image-modeling checkpoint.
    Mim(mim::MimArgs),
    /// Run BeitImageProcessor on an image and write the pixel values (and segmentation labels) as .npy.
    Preprocess(preprocess::PreprocessArgs),
    /// Run a model on float32 NCHW pixel values and write every output tensor to a safetensors file.
    Forward(forward::ForwardArgs),
    /// Fine-tune (or train from scratch) an image classifier on an image folder, or (--task semantic-segmentation)
    /// a segmentation model on images with masks.
    Train(train::TrainArgs),
    /// Pre-train a masked-image-modeling model (BEiT) on an image folder, with DALL-E visual tokens as targets.
    Pretrain(pretrain::PretrainArgs),
    /// Evaluate an image classifier (top-1, top-5, confusion matrix) or a segmentation model (per-class IoU and
    /// accuracy, mIoU, mAcc, aAcc).
    Eval(train::EvalArgs),
    /// Convert a checkpoint (.bin, msgpack, Hub id) to config.json + model.safetensors.
    Convert(convert::ConvertArgs),
    /// Serve classify, segment and embed over HTTP, with dynamic batching, health, info and Prometheus metrics.
    Serve(serve::ServeArgs),
    /// Visual tokens of images with the DALL-E dVAE encoder (BEiT's tokenizer): int64 .npy.
    Tokenize(tokenize::TokenizeArgs),
}

/// Logs to stderr, filtered by RUST_LOG (default: warnings; `beit serve` adds its one line per request). `serve
/// --log-format json` writes one JSON object per line.
fn init_logging(command: &Command) {
    let (default, json) = match command {
        Command::Serve(a) => ("warn,beit_server=info", a.json_logs()),
        _ => ("warn", false),
    };
    let filter = tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| default.into());
    // Colour only on a terminal: a log file or collector gets plain text.
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let builder = tracing_subscriber::fmt().with_writer(std::io::stderr).with_ansi(ansi).with_env_filter(filter);
    if json {
        builder.event_format(beit_server::log::JsonFormat).init();
    } else {
        builder.init();
    }
}

/// glibc hands every large freed block back to the kernel (mmap/munmap, trimming the heap top), and its dynamic
/// threshold does not settle when megabyte images are decoded, resized and freed on several loading threads: over
/// 500 photos that tripled the system time (0.36 -> 1.16 s) and made `beit classify` 5-15% slower. Keeping such
/// blocks in the heap is what a tool that streams images wants; peak memory stays bounded by the loading queue.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
fn tune_allocator() {
    // SAFETY: mallopt only sets the allocator's parameters; it runs before any other thread exists.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 64 << 20);
        libc::mallopt(libc::M_TRIM_THRESHOLD, 256 << 20);
    }
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn tune_allocator() {}

fn main() -> ExitCode {
    tune_allocator();
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            // --help and --version are not errors; bad arguments exit 2 as clap does.
            let _ = e.print();
            return ExitCode::from(if e.use_stderr() { 2 } else { 0 });
        }
    };
    init_logging(&cli.command);
    let result = match cli.command {
        Command::Classify(a) => classify::run(a),
        Command::Bench(a) => bench::run(a),
        Command::Segment(a) => segment::run(a),
        Command::Embed(a) => embed::run(a),
        Command::Mim(a) => mim::run(a),
        Command::Preprocess(a) => preprocess::run(a),
        Command::Forward(a) => forward::run(a),
        Command::Convert(a) => convert::run(a),
        Command::Train(a) => train::run(a),
        Command::Eval(a) => train::eval(a),
        Command::Pretrain(a) => pretrain::run(a),
        Command::Serve(a) => serve::run(a),
        Command::Tokenize(a) => tokenize::run(a),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            if let Some(hint) = e.chain().find_map(|c| c.downcast_ref::<beit::BeitError>()).and_then(hint) {
                eprintln!("hint: {hint}");
            }
            ExitCode::FAILURE
        }
    }
}

/// The command-line flag behind a library error, which the library itself does not name.
fn hint(e: &beit::BeitError) -> Option<&'static str> {
    use beit::BeitError;
    Some(match e {
        BeitError::Diverged { .. } => "lower the learning rate (--lr)",
        BeitError::InvalidInput { what, .. } => match what.as_str() {
            "weights format" => "--weights-format takes safetensors, bin or msgpack",
            "timm model name" => "set by --timm-model",
            "validation split" => "set by --val-split",
            "mask_ratio" => "set by --mask-ratio",
            "num_masking_patches" | "masking" => "set by --num-masking-patches",
            "crop scale minimum" => "set by --crop-scale-min",
            "preset" | "model" => "--model takes a directory, a weights file, a Hub repo id or a preset",
            _ => return None,
        },
        BeitError::Unsupported { message, .. } if message.contains("loaded for inference") => {
            "load it with --dtype left out, or use `beit convert`"
        }
        _ => return None,
    })
}
