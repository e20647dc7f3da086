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
            // NIX_FMT_WRITE=1 formats in place, as alejandra would.
            Status::Changed(_)
                if after != before && std::env::var_os("NIX_FMT_WRITE").is_some() =>
            {
                if let Err(e) = std::fs::write(&path, &after) {
                    eprintln!("{path}: {e}");
                    failed = true;
                }
            }
            Status::Changed(_) if after != before => {
                eprintln!(
                    "{path}: not formatted (run alejandra on it, or NIX_FMT_WRITE=1 with this)"
                );
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
