//! Prints the five most likely next tokens of a prompt on SmolLM2-135M-Instruct
//! (fetched once into the kedit cache), or on the model given with `--model`.
//!
//! ```text
//! cargo run --release --example complete -- "The capital of France is"
//! cargo run --release --example complete -- --model path/to/model.gguf "Some prompt"
//! ```

use std::time::Instant;

mod common;

fn main() -> std::process::ExitCode {
    common::exit_status(run())
}

fn run() -> Result<(), Box<dyn std::error::Error>> {
    let mut args: Vec<String> = std::env::args().skip(1).collect();
    let model_path = match args.iter().position(|a| a == "--model") {
        Some(i) if i + 1 < args.len() => {
            let path = args.remove(i + 1);
            args.remove(i);
            path
        }
        Some(_) => return Err("--model needs a path".into()),
        None => kedit::fetch::ensure(&kedit::fetch::SMOLLM2_135M)?
            .display()
            .to_string(),
    };
    if let Some(flag) = args.iter().find(|a| a.starts_with("--")) {
        return Err(
            format!("unknown option {flag:?} (usage: complete [--model PATH] [PROMPT…])").into(),
        );
    }
    let prompt = args.join(" ");
    let prompt = if prompt.is_empty() {
        "The capital of France is".to_string()
    } else {
        prompt
    };

    let start = Instant::now();
    let model = kedit::Model::load(&model_path)?;
    let cfg = model.config();
    println!(
        "loaded {model_path} ({:?}, {} layers, d_model {}) in {:.2} s",
        cfg.family,
        cfg.n_layers,
        cfg.d_model,
        start.elapsed().as_secs_f64()
    );
    let start = Instant::now();
    let top = model.top_k(&prompt, 5)?;
    println!(
        "top-5 next tokens after {prompt:?} ({:.0} ms):",
        start.elapsed().as_secs_f64() * 1e3
    );
    for t in top {
        println!("  {:>7.4}  {:?}", t.prob, t.text);
    }
    Ok(())
}
