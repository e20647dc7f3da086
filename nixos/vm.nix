# The demo VM behind `nix run .#vm`: the whole pipeline, sized for two JVMs,
# with every service port forwarded to the same port on the host's loopback.
#
# This is the one configuration under nixos/ that is not a reusable module,
# so it is also the one that may configure nixpkgs (.ci/nix-check checks).
{lib, ...}: {
  nixpkgs.hostPlatform = "x86_64-linux";
  # MinIO upstream is no longer maintained and nixos-26.05 marks it
  # insecure. This demo permits exactly that package, by name; a host reusing
  # the modules decides for itself (see the README).
  nixpkgs.config.allowInsecurePredicate = pkg: lib.getName pkg == "minio";

  services.cdc-lake.enable = true;
  # The web UI for PostgreSQL the docker-compose design had; off in the
  # module, on here. (nixpkgs has no web UI for a KRaft Kafka: its only one,
  # CMAK, needs ZooKeeper. Grafana's dashboard shows the consumer lag.)
  services.cdc-lake.pgadmin.enable = true;

  networking.hostName = "cdc-lake";
  system.stateVersion = "26.05";

  # A root file system so the configuration also evaluates outside the VM.
  boot.loader.grub.enable = false;
  fileSystems."/" = {
    device = "/dev/disk/by-label/nixos";
    fsType = "ext4";
  };

  virtualisation.vmVariant = {
    # Convenience for a throwaway VM only: nixosConfigurations.vm itself,
    # were it ever deployed, gets neither autologin nor an empty password.
    services.getty.autologinUser = "root";
    users.users.root.initialHashedPassword = lib.mkDefault "";

    virtualisation = {
      memorySize = 6144;
      cores = 4;
      diskSize = 8192;
      graphics = false;
      # host.address defaults to every interface of the host, which would
      # put Kafka, the unauthenticated Connect REST API, PostgreSQL, MinIO,
      # the UIs and the unauthenticated metrics endpoints on the LAN.
      # Loopback only.
      forwardPorts =
        map (port: {
          from = "host";
          host = {
            address = "127.0.0.1";
            inherit port;
          };
          guest = {inherit port;};
        }) [
          3000 # Grafana
          5050 # pgAdmin
          5432 # PostgreSQL
          8083 # Kafka Connect REST
          9000 # MinIO S3 API
          9001 # MinIO console
          9090 # Prometheus
          9092 # Kafka
          9464 # cdc-sink /metrics, /healthz, /readyz
          9465 # tweetgen /metrics, /healthz, /readyz
        ];
    };
    # Forwarded connections arrive from the user-mode network, not loopback:
    # listen there too (the VM has no other network, and the host side is
    # bound to 127.0.0.1 above).
    services.minio.listenAddress = lib.mkForce ":9000";
    services.minio.consoleAddress = lib.mkForce ":9001";
    services.apache-kafka.settings.listeners = lib.mkForce [
      "PLAINTEXT://0.0.0.0:9092"
      "CONTROLLER://127.0.0.1:9093"
    ];
    services.debezium.settings.listeners = "http://0.0.0.0:8083";
    services.grafana.settings.server.http_addr = "0.0.0.0";
    services.prometheus.listenAddress = "0.0.0.0";
    services.pgadmin.settings.DEFAULT_SERVER = "0.0.0.0";
    services.cdc-sink.metrics.address = "0.0.0.0";
    services.tweetgen.metrics.address = "0.0.0.0";
    networking.firewall.allowedTCPPorts = [3000 5050 5432 8083 9000 9001 9090 9092 9464 9465];
    services.postgresql.enableTCPIP = true;
    services.postgresql.authentication = ''
      host twitter tweetgen 10.0.2.0/24 scram-sha-256
    '';
  };
}
