# db/captured-tables as Nix: the type of the `capturedTables` options of
# services.cdc-lake and services.debezium, their default (the file's
# tables, so the local stack and NixOS capture the same list) and the
# connector's table.include.list rendered from a list.
lib: {
  # Plain lower-case names of schema public, as db/capture.sh accepts: they
  # need no quoting in SQL, in the connector's regex list or in topic and S3
  # names.
  type = lib.types.nonEmptyListOf (lib.types.strMatching "[a-z_][a-z0-9_]{0,62}");

  default = lib.pipe (builtins.readFile ../db/captured-tables) [
    (lib.splitString "\n")
    (map (line: lib.trim (lib.head (lib.splitString "#" line))))
    (lib.filter (name: name != ""))
  ];

  includeList = lib.concatMapStringsSep "," (t: "public.${t}");
}
