//! Fetches SmolLM2-135M-Instruct into the kedit cache (once) and prints its path.
//!
//! ```text
//! cargo run --release --example fetch_model
//! ```

mod common;

fn main() -> std::process::ExitCode {
    common::exit_status(run())
}

fn run() -> Result<(), kedit::Error> {
    let path = kedit::fetch::ensure(&kedit::fetch::SMOLLM2_135M)?;
    println!("{}", path.display());
    Ok(())
}
