//! What the examples share: how they end.

use std::fmt::Display;
use std::process::ExitCode;

/// Prints an error in readable form (not `Debug`, as returning it from
/// `main` would) and turns the outcome into the exit status.
pub fn exit_status<E: Display>(outcome: Result<(), E>) -> ExitCode {
    match outcome {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}
