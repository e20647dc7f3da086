use std::process::ExitCode;

use cdc_telemetry::Readiness;
use cdc_telemetry::systemd::Watchdog;
use clap::Parser;
use slot_guard::cli::Cli;
use slot_guard::config::Config;
use tokio::sync::watch;

#[tokio::main]
async fn main() -> ExitCode {
    cdc_telemetry::init();
    let cli = Cli::parse();
    match run(cli).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            // Once, with its causes; systemd puts stderr in the journal too.
            eprintln!("cdc-slot-guard: {err:#}");
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
    let readiness = Readiness::new("connecting to PostgreSQL and Kafka Connect");
    let _ops = slot_guard::guard::serve(&config.metrics, readiness.clone()).await?;
    slot_guard::guard::run(&config, readiness, Watchdog::from_env(), stop_rx).await?;
    Ok(())
}
