# The project's packages: both Rust binaries in one build, and the Debezium
# PostgreSQL connector plugin from the same Maven Central tarball that
# tests/stack.sh uses locally. debezium/plugin.json holds its digest twice:
# `sha256` (hex) for stack.sh's sha256sum, `hash` (SRI) for fetchurl;
# .ci/nix-check checks both against the downloaded tarball.
{pkgs}: let
  inherit (pkgs) lib;
  cargoToml = lib.importTOML ../Cargo.toml;
  plugin = lib.importJSON ../debezium/plugin.json;
in {
  cdc-lake = pkgs.rustPlatform.buildRustPackage {
    pname = "cdc-lake";
    inherit (cargoToml.workspace.package) version;
    src = lib.fileset.toSource {
      root = ../.;
      fileset = lib.fileset.unions [
        ../Cargo.toml
        ../Cargo.lock
        ../crates
        ../db
      ];
    };
    cargoLock.lockFile = ../Cargo.lock;
    # rdkafka builds its bundled librdkafka with cmake (feature cmake-build),
    # linked against the system zlib that libz-sys finds with pkg-config.
    # Nothing links curl or OpenSSL: rdkafka has neither its `ssl` nor its
    # `curl` feature, and object_store talks TLS through rustls.
    nativeBuildInputs = [pkgs.cmake pkgs.pkg-config];
    buildInputs = [pkgs.zlib];
    # The default feature `stack-tests` enables the tests that need the live
    # stack; the sandbox has none, so only the unit tests run here.
    buildNoDefaultFeatures = true;
    # The benchmarks' tool (crates/bench-tools) is not part of the services.
    cargoBuildFlags = ["--workspace" "--exclude" "cdc-bench-tools"];
    checkNoDefaultFeatures = true;
    meta = {
      description = "Change data capture from PostgreSQL to Delta Lake tables on S3 (tweetgen, cdc-sink, cdc-slot-guard)";
      license = lib.licenses.asl20;
      mainProgram = "cdc-sink";
    };
  };

  debezium-connector-postgres = pkgs.stdenvNoCC.mkDerivation {
    pname = plugin.artifactId;
    inherit (plugin) version;
    src = pkgs.fetchurl {
      url = "mirror://maven/${lib.replaceStrings ["."] ["/"] plugin.groupId}/${plugin.artifactId}/${plugin.version}/${plugin.artifactId}-${plugin.version}-${plugin.classifier}.${plugin.type}";
      inherit (plugin) hash;
    };
    dontUnpack = true;
    # The project's value converter (debezium/converter; the connector JSON
    # names it in `converters` and `value.converter`) is compiled here
    # against the connector's own jars and Kafka's connect-api, connect-json,
    # clients and Jackson, as tests/stack.sh does, into the
    # connector's directory so Connect loads it with the connector.
    nativeBuildInputs = [pkgs.jdk17_headless pkgs.strip-nondeterminism];
    converterSrc = lib.fileset.toSource {
      root = ../debezium/converter;
      fileset = ../debezium/converter/src;
    };
    installPhase = ''
      runHook preInstall
      mkdir -p $out/share/kafka-connect
      tar -xzf $src -C $out/share/kafka-connect
      dir=$out/share/kafka-connect/debezium-connector-postgres
      classes=$(mktemp -d)
      javac --release 17 -nowarn -d "$classes" \
        -cp "$(ls $dir/debezium-api-*.jar $dir/debezium-core-*.jar ${pkgs.apacheKafka_4_1}/libs/{connect-api,connect-json,kafka-clients,jackson-core,jackson-databind,jackson-annotations}-[0-9]*.jar | paste -sd:)" \
        $(find $converterSrc -name '*.java')
      jar cf $dir/cdc-lake-converter.jar -C "$classes" .
      # JDK 17's jar stamps entries with the build time.
      strip-nondeterminism --type jar $dir/cdc-lake-converter.jar
      runHook postInstall
    '';
    meta = {
      description = "Debezium PostgreSQL connector, as a Kafka Connect plugin directory";
      homepage = "https://debezium.io";
      license = lib.licenses.asl20;
      # The connector's jars from Maven Central; the converter built here.
      sourceProvenance = [lib.sourceTypes.binaryBytecode lib.sourceTypes.fromSource];
      platforms = lib.platforms.all;
    };
  };
}
