# The `metrics` options of services.cdc-sink and services.tweetgen: where
# the service serves GET /metrics, /healthz and /readyz. The module writes
# them into the service's settings as `metrics.listen` ("" when disabled);
# the pipeline's Prometheus scrapes the same address. Setting
# `settings.metrics.listen` by hand is refused by an assertion that names
# these options, so the scrape target cannot drift from the listener.
lib: {
  service,
  port,
}: let
  inherit (lib) mkOption types;
in {
  options = {
    enable = mkOption {
      type = types.bool;
      default = true;
      description = "Whether ${service} serves its metrics and health endpoints.";
    };
    address = mkOption {
      type = types.str;
      default = "127.0.0.1";
      example = "::1";
      description = ''
        Address the metrics and health endpoints of ${service} listen on.
        They have no authentication: keep them on loopback or a trusted
        network.
      '';
    };
    port = mkOption {
      type = types.port;
      default = port;
      description = "Port of the metrics and health endpoints of ${service}.";
    };
  };

  # The settings value of `metrics.listen` for these options.
  listen = metrics:
    if metrics.enable
    then
      (
        if lib.hasInfix ":" metrics.address
        then "[${metrics.address}]"
        else metrics.address
      )
      + ":${toString metrics.port}"
    else "";
}
