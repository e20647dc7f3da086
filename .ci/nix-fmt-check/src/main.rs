//! `nix-fmt-check FILE...`: exits 1 and names each file that alejandra
//! would reformat (or cannot parse), like `alejandra --check`.

use std::process::ExitCode;

use alejandra::format::{in_memory, Status};

fn main() -> ExitCode {
    let mut failed = false;
    for path in std::env::args().skip(1) {
        let before = match std::fs::read_to_string(&path) {
            Ok(s) => s,
            Err(e) => {
                eprintln!("{path}: {e}");
                failed = true;
                continue;
            }
        };
        let (status, after) = in_memory(path.clone(), before.clone());
        match status {
            Status::Error(e) => {
                eprintln!("{path}: does not parse: {e}");
                failed = true;
            }
            Status::Changed(_) if after != before => {
                eprintln!("{path}: not formatted (run alejandra on it)");
                failed = true;
            }
            Status::Changed(_) => {}
        }
    }
    if failed {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    }
}
