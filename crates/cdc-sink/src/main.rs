use std::process::ExitCode;

use cdc_sink::cli::{Cli, Command};
use cdc_sink::config::SinkConfig;
use cdc_sink::lake::{mirror, upkeep};
use cdc_sink::{memory, pipeline, telemetry};
use cdc_telemetry::Readiness;
use clap::Parser;
use tokio::sync::watch;

fn main() -> ExitCode {
    let cli = Cli::parse();
    let config = match SinkConfig::from_figment(cli.figment()) {
        Ok(config) => config,
        Err(err) => return fail(err.into()),
    };
    // Before the runtime's threads; see `memory`.
    if config.mirror.enabled || matches!(cli.command, Some(Command::Mirror { .. })) {
        memory::limit_malloc_arenas();
    }
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(runtime) => runtime,
        Err(err) => return fail(err.into()),
    };
    // The error is printed before the runtime waits for its blocking tasks.
    match runtime.block_on(run(cli, config)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => fail(err),
    }
}

/// Once, with its causes; systemd puts stderr in the journal too.
fn fail(err: anyhow::Error) -> ExitCode {
    eprintln!("cdc-sink: {err:#}");
    ExitCode::FAILURE
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
