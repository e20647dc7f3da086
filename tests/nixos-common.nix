# What both VM tests share: the node and the Python helpers of the test
# script. Kept separate so that the two scenarios assert the same things.
{
  self,
  pkgs,
}: let
  python = pkgs.python3.withPackages (ps: [ps.boto3 ps.pyarrow]);
  kafka = pkgs.apacheKafka_4_1;
in {
  node = {
    imports = [self.nixosModules.pipeline];
    services.cdc-lake.enable = true;
    services.cdc-sink.settings.flush.max_age_ms = 2000;
    services.tweetgen.settings.workload.interval_ms = 1000;
    virtualisation = {
      memorySize = 6144;
      cores = 4;
      diskSize = 8192;
    };
    environment.systemPackages = [python kafka pkgs.postgresql_15];
  };

  # Lists object keys under a prefix; a store path, so that the Python test
  # script can embed the command without quoting trouble.
  s3ls = let
    script = pkgs.writeText "s3ls.py" ''
      import sys, boto3
      secret = open("/var/lib/cdc-lake/secrets/minio-root-password").read().strip()
      s3 = boto3.client("s3", endpoint_url="http://127.0.0.1:9000", aws_access_key_id="cdclake",
                        aws_secret_access_key=secret, region_name="us-east-1")
      for o in s3.list_objects_v2(Bucket="lake", Prefix=sys.argv[1]).get("Contents", []):
          print(o["Key"])
    '';
  in "python3 ${script}";

  prelude = ''
    def start_and_wait():
        machine.start()
        for unit in ["postgresql.service", "apache-kafka.service", "minio.service",
                     "cdc-lake-db.service", "debezium-connector.service",
                     "tweetgen.service", "cdc-sink.service"]:
            machine.wait_for_unit(unit, timeout=600)

    def settle_and_check():
        # Stop the workload, let Debezium publish the tail, let the sink
        # commit everything (lag 0 on every partition), then compare.
        machine.succeed("systemctl stop tweetgen.service")
        machine.sleep(15)
        machine.wait_until_succeeds(
            "${kafka}/bin/kafka-consumer-groups.sh --bootstrap-server 127.0.0.1:9092 "
            "--describe --group cdc-sink 2>/dev/null "
            "| awk 'NR>1 && $2 ~ /^twitter/ {n++; if ($6 != 0) bad=1} END {exit (bad || n == 0)}'",
            timeout=300,
        )
        print(machine.succeed(
            "install -m 0400 -o postgres /var/lib/cdc-lake/secrets/minio-root-password /tmp/minio-pw && "
            "cd /tmp && sudo -u postgres python3 ${./lake_check.py} http://127.0.0.1:9000 lake /tmp/minio-pw"
        ))
  '';
}
