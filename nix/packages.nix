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
    checkNoDefaultFeatures = true;
    meta = {
      description = "Change data capture from PostgreSQL to Delta Lake tables on S3 (tweetgen, cdc-sink)";
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
    installPhase = ''
      runHook preInstall
      mkdir -p $out/share/kafka-connect
      tar -xzf $src -C $out/share/kafka-connect
      runHook postInstall
    '';
    meta = {
      description = "Debezium PostgreSQL connector, as a Kafka Connect plugin directory";
      homepage = "https://debezium.io";
      license = lib.licenses.asl20;
      # Jars from Maven Central, not built here.
      sourceProvenance = [lib.sourceTypes.binaryBytecode];
      platforms = lib.platforms.all;
    };
  };
}
