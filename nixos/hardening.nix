# systemd sandboxing shared by the two Rust services: they need the network
# and their credentials, nothing else. The VM test holds both to
# `systemd-analyze security` exposure <= 2.0 ("OK").
{
  DynamicUser = true;
  ProtectSystem = "strict";
  ProtectHome = true;
  PrivateTmp = true;
  PrivateDevices = true;
  PrivateMounts = true;
  NoNewPrivileges = true;
  CapabilityBoundingSet = [""];
  AmbientCapabilities = [""];
  SystemCallFilter = ["@system-service" "~@privileged" "~@resources"];
  SystemCallArchitectures = "native";
  RestrictAddressFamilies = ["AF_INET" "AF_INET6" "AF_UNIX"];
  RestrictNamespaces = true;
  RestrictRealtime = true;
  RestrictSUIDSGID = true;
  LockPersonality = true;
  MemoryDenyWriteExecute = true;
  ProtectClock = true;
  ProtectControlGroups = true;
  ProtectHostname = true;
  ProtectKernelLogs = true;
  ProtectKernelModules = true;
  ProtectKernelTunables = true;
  ProtectProc = "invisible";
  ProcSubset = "pid";
  UMask = "0077";
  Restart = "on-failure";
  RestartSec = 5;
}
