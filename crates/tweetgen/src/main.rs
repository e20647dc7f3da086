use std::process::ExitCode;

use cdc_telemetry::Readiness;
use cdc_telemetry::systemd::Watchdog;
use clap::Parser;
use tokio::sync::watch;
use tweetgen::cli::Cli;
use tweetgen::config::Config;
use tweetgen::workload::RunOptions;

#[tokio::main]
async fn main() -> ExitCode {
    cdc_telemetry::init();
    let cli = Cli::parse();
    match run(cli).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            // Once, with its causes; systemd puts stderr in the journal too.
            eprintln!("tweetgen: {err:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    let config = Config::from_figment(cli.figment())?;
    if cli.check_config {
        config.database.resolve_password()?;
        println!("configuration OK\n{config:#?}");
        return Ok(());
    }
    let (stop_tx, stop_rx) = watch::channel(false);
    tokio::spawn(cdc_telemetry::shutdown_signal(stop_tx));
    // Served from before the first connection, so a probe sees why it waits.
    let readiness = Readiness::new("connecting to PostgreSQL");
    let _ops = tweetgen::telemetry::serve(&config.metrics, readiness.clone()).await?;
    let options = RunOptions {
        limits: cli.limits(),
        rate: cli.rate,
        readiness,
        watchdog: Watchdog::from_env(),
        before_commit: None,
    };
    let summary = tweetgen::workload::run_with(&config, options, stop_rx).await?;
    tracing::info!(
        batches = summary.batches,
        rows = summary.rows,
        reconnects = summary.reconnects,
        ambiguous_commits = summary.ambiguous_commits,
        secs = format!("{:.1}", summary.elapsed.as_secs_f64()),
        rows_per_sec = summary.rows_per_sec() as u64,
        "finished"
    );
    Ok(())
}
