use std::process::ExitCode;

use cdc_sink::cli::{Cli, Command};
use cdc_sink::config::SinkConfig;
use cdc_sink::lake::{mirror, upkeep};
use cdc_sink::{memory, pipeline, telemetry};
use cdc_telemetry::Readiness;
use clap::Parser;
use tokio::sync::watch;

fn main() -> ExitCode {
    match start(Cli::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            // Once, with its causes; systemd puts stderr in the journal too.
            eprintln!("cdc-sink: {err:#}");
            ExitCode::FAILURE
        }
    }
}

fn start(cli: Cli) -> anyhow::Result<()> {
    let config = SinkConfig::from_figment(cli.figment())?;
    // Before the runtime's threads (see `memory`); only with current-state
    // tables, whose rewrites are what the extra arenas hold.
    if config.mirror.enabled {
        memory::limit_malloc_arenas();
    }
    tokio::runtime::Runtime::new()?.block_on(run(cli, config))
}

async fn run(cli: Cli, config: SinkConfig) -> anyhow::Result<()> {
    cdc_telemetry::init();
    // Test builds only: the failpoints named in FAILPOINTS.
    #[cfg(feature = "failpoints")]
    let _failpoints = fail::FailScenario::setup();
    if cli.check_config {
        config.s3.resolve_secret()?;
        println!("configuration OK\n{config:#?}");
        return Ok(());
    }
    match cli.command {
        Some(Command::Upkeep { dry_run }) => {
            upkeep::run(&config, dry_run).await?;
            return Ok(());
        }
        Some(Command::Mirror { table, rebuild }) => {
            mirror::run(&config, table.as_deref(), rebuild).await?;
            return Ok(());
        }
        None => {}
    }
    let (stop_tx, stop_rx) = watch::channel(false);
    tokio::spawn(cdc_telemetry::shutdown_signal(stop_tx));
    // Served from the start, so a probe sees why the sink is not ready yet.
    let readiness = Readiness::new("starting").with_gauge(telemetry::READY);
    let _ops = telemetry::serve(&config.metrics, readiness.clone()).await?;
    pipeline::run(&config, readiness, stop_rx).await?;
    Ok(())
}
