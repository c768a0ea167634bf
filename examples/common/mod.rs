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

/// Parses the value of a command-line flag, naming the flag and the value
/// when it does not parse. (Not every example takes such flags.)
#[allow(dead_code)]
pub fn parse_value<T>(flag: &str, value: &str) -> Result<T, String>
where
    T: std::str::FromStr,
    T::Err: Display,
{
    value
        .parse()
        .map_err(|e| format!("{flag}: {value:?} is not valid ({e})"))
}
