//! The `spillway` command: `spillway bench`, `spillway info` and `spillway nvme`.

use std::process::ExitCode;

use spillway::bench;
use spillway::cli::{self, Command, Workload};
use spillway::exit;
use spillway::info;
use spillway::nvme;

fn main() -> ExitCode {
    keep_cufile_log_out_of_cwd();
    init_logging();
    let cli = cli::parse();
    let outcome = match &cli.command {
        Command::Bench(args) => match (args.workload, cli::bench_settings(args)) {
            (Workload::Seq, settings) if args.sweep => bench::sweep::run(args, &settings).map(|sweep| {
                if args.json {
                    bench::sweep::print_json(&sweep);
                } else {
                    bench::sweep::print_table(&sweep);
                }
                verification_exit(sweep.verification_failed())
            }),
            (Workload::Seq, settings) => bench::run(args, &settings).map(|results| {
                let failed = results.iter().any(|r| r.verified == Some(false));
                if args.json {
                    bench::report::print_json(&results);
                } else {
                    bench::report::print_table(&results);
                }
                verification_exit(failed)
            }),
            (Workload::Tensors, settings) => bench::tensors::run(args, &settings).map(|result| {
                if args.json {
                    bench::tensors::report::print_json(&result);
                } else {
                    bench::tensors::report::print_table(&result);
                }
                verification_exit(!result.verified)
            }),
        },
        Command::Info(args) => info::run(args).map(|()| ExitCode::SUCCESS),
        Command::Nvme(args) => {
            return nvme::run(args).map_or_else(
                |e| exit::report(&e, exit::status_of_pci(&e)),
                |()| ExitCode::SUCCESS,
            )
        }
    };
    // The runtime's errors carry their causes in their text; the status follows the
    // table in `exit`.
    outcome.unwrap_or_else(|e| exit::report(&e, exit::status_of(&e)))
}

/// The mismatch status when data read back differed from data written, success otherwise.
fn verification_exit(failed: bool) -> ExitCode {
    if failed {
        exit::report(
            &"verification failed: data read back differs from data written",
            exit::MISMATCH,
        )
    } else {
        ExitCode::from(exit::OK)
    }
}

/// Logs go to stderr; `SPILLWAY_LOG` (or `RUST_LOG`) sets the filter, default "warn".
fn init_logging() {
    let filter = std::env::var("SPILLWAY_LOG")
        .or_else(|_| std::env::var("RUST_LOG"))
        .unwrap_or_else(|_| "warn".into());
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::new(filter))
        .with_writer(std::io::stderr)
        // Colours only on a terminal: piped or redirected logs stay plain text.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .try_init();
}

/// libcufile writes `cufile.log` into the current directory unless told otherwise; send it
/// to the temporary directory instead. Runs first, while the process has one thread.
fn keep_cufile_log_out_of_cwd() {
    if std::env::var_os("CUFILE_LOGFILE_PATH").is_none() {
        let path = std::env::temp_dir().join("spillway-cufile.log");
        std::env::set_var("CUFILE_LOGFILE_PATH", path);
    }
}
