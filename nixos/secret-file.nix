# Option type for the `*File` secret options: an absolute path outside the
# Nix store, given as a string. A Nix path value (a path written without
# quotes) is rejected although it is not in the store yet: interpolating it
# into the unit's LoadCredential would copy the secret into the
# world-readable store.
lib:
lib.types.addCheck (lib.types.pathWith {
  absolute = true;
  inStore = false;
})
builtins.isString
// {
  description = "absolute path outside the Nix store, as a string";
}
