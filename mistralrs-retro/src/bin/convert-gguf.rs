//! `convert-gguf <model.gguf> <out_dir>`: writes a Hugging Face model directory (f32
//! safetensors, config, tokenizer) from a llama-architecture GGUF.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use mistralrs_retro::convert::convert_gguf_to_hf;

#[derive(Parser)]
#[command(about = "Convert a llama-architecture GGUF into a Hugging Face model directory")]
struct Args {
    /// The GGUF file to read.
    gguf: PathBuf,
    /// The directory to write; created if missing, existing files are overwritten.
    out_dir: PathBuf,
}

fn main() -> ExitCode {
    let args = Args::parse();
    match convert_gguf_to_hf(&args.gguf, &args.out_dir) {
        Ok(report) => {
            for warning in &report.warnings {
                eprintln!("warning: {warning}");
            }
            for file in &report.files {
                let size = std::fs::metadata(file).map(|m| m.len()).unwrap_or(0);
                println!("wrote {} ({size} bytes)", file.display());
            }
            println!(
                "{} tensors, {} parameters, vocab {}, tie_word_embeddings {}",
                report.tensor_count,
                report.parameter_count,
                report.vocab_size,
                report.tie_word_embeddings
            );
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("convert-gguf: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
