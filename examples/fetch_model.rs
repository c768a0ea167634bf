//! Fetches SmolLM2-135M-Instruct into the kedit cache (once) and prints its path.
//!
//! ```text
//! cargo run --release --example fetch_model
//! ```

/// Prints errors in readable form (not `Debug`) and exits with status 1.
fn main() -> std::process::ExitCode {
    match run() {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}

fn run() -> Result<(), kedit::Error> {
    let path = kedit::fetch::ensure(&kedit::fetch::SMOLLM2_135M)?;
    println!("{}", path.display());
    Ok(())
}
