#!/usr/bin/env python3
"""Static checks on the Nix files that need more than grep, for a machine
that cannot evaluate nixpkgs. Each file is first normalised by
`nix-instantiate --parse`, which drops comments and expands attribute paths
(`a.b.c = x;` becomes `a = { b = { c = x; }; };`), so the checks see the
same structure however the source is written.

  nix-lint.py nixpkgs-config FILE...   no file sets nixpkgs.config
  nix-lint.py port-forwards FILE...    every VM port forward binds 127.0.0.1
  nix-lint.py readme-modules README FLAKE TEST
                                       the README's host example imports only
                                       modules the flake exports, and the
                                       sink-host test imports exactly those
"""

import re
import subprocess
import sys
import tempfile


def parse(path):
    out = subprocess.run(
        ["nix-instantiate", "--parse", path], capture_output=True, text=True
    )
    if out.returncode != 0:
        sys.exit(f"{path}: does not parse:\n{out.stderr}")
    return out.stdout


def tokens(src):
    """Tokens of normalised Nix: identifiers, punctuation and strings. A
    string is one token ("S", text) when it has no antiquotation; the code
    inside `${...}` of a string is tokenised like any other code."""
    out, i, n = [], 0, len(src)
    stack = []  # "code" inside ${...}, "str" inside a string
    buf = []
    while i < n:
        c = src[i]
        if stack and stack[-1] == "str":
            if c == "\\":
                buf.append(src[i : i + 2])
                i += 2
            elif src.startswith("${", i):
                out.append(("S", None))  # a string with code in it
                buf = []
                stack.append("code")
                out.append(("(", "("))
                i += 2
            elif c == '"':
                stack.pop()
                out.append(("S", "".join(buf)))
                buf = []
                i += 1
            else:
                buf.append(c)
                i += 1
            continue
        if c == '"':
            stack.append("str")
            buf = []
            i += 1
        elif c == "}" and stack and stack[-1] == "code":
            stack.pop()
            out.append((")", ")"))
            i += 1
        elif c == "{" and stack and stack[-1] == "code":
            stack.append("brace")
            out.append(("{", "{"))
            i += 1
        elif c == "}" and stack and stack[-1] == "brace":
            stack.pop()
            out.append(("}", "}"))
            i += 1
        elif c.isspace():
            i += 1
        else:
            m = re.match(r"[A-Za-z_][A-Za-z0-9_'-]*", src[i:])
            if m:
                out.append(("I", m.group(0)))
                i += m.end()
            else:
                out.append((c, c))
                i += 1
    return out


OPEN, CLOSE = "{([", "})]"


def value_end(toks, start):
    """Index of the `;` that ends the binding whose value starts at start."""
    depth = 0
    for k in range(start, len(toks)):
        t = toks[k][0]
        if t in OPEN:
            depth += 1
        elif t in CLOSE:
            depth -= 1
        elif t == ";" and depth == 0:
            return k
    return len(toks)


def bindings(toks, brace):
    """(name, value start) of the bindings directly inside the attribute set
    that opens at index brace."""
    found, depth, k = [], 0, brace + 1
    while k < len(toks):
        t, v = toks[k]
        if t in OPEN:
            depth += 1
        elif t in CLOSE:
            if depth == 0:
                break
            depth -= 1
        elif depth == 0 and t == "I" and k + 1 < len(toks) and toks[k + 1][0] == "=":
            found.append((v, k + 2))
        k += 1
    return found


def assignments(toks, name):
    """Value start indexes of every binding `name = ...`."""
    return [
        k + 2
        for k in range(len(toks) - 1)
        if toks[k] == ("I", name) and toks[k + 1][0] == "=" and (k == 0 or toks[k - 1][0] != ".")
    ]


def attrsets_in(toks, start, end):
    return [k for k in range(start, end) if toks[k][0] == "{"]


def check_nixpkgs_config(files):
    bad = []
    for f in files:
        toks = tokens(parse(f))
        for start in assignments(toks, "nixpkgs"):
            end = value_end(toks, start)
            for brace in attrsets_in(toks, start, end):
                if any(name == "config" for name, _ in bindings(toks, brace)):
                    bad.append(f)
    for f in sorted(set(bad)):
        print(f"  {f} sets nixpkgs.config (breaks hosts that set nixpkgs.pkgs)", file=sys.stderr)
    if not bad:
        print(f"  {len(files)} reusable module files, none sets nixpkgs.config")
    return not bad


def check_port_forwards(files):
    ok, count = True, 0
    for f in files:
        toks = tokens(parse(f))
        for start in assignments(toks, "forwardPorts"):
            end = value_end(toks, start)
            hosts = [
                k + 2
                for k in range(start, end - 2)
                if toks[k] == ("I", "host") and toks[k + 1][0] == "=" and toks[k + 2][0] == "{"
            ]
            if not hosts:
                print(f"  {f}: forwardPorts without a literal host = {{ ... }} to check", file=sys.stderr)
                ok = False
            for brace in hosts:
                count += 1
                values = [v for name, v in bindings(toks, brace) if name == "address"]
                literal = (
                    len(values) == 1
                    and toks[values[0]] == ("S", "127.0.0.1")
                    and toks[values[0] + 1][0] == ";"
                )
                if not literal:
                    print(f'  {f}: a forwardPorts entry does not set host.address = "127.0.0.1"', file=sys.stderr)
                    ok = False
        for t, v in toks:
            if t == "S" and v and "hostfwd=" in v:
                for fwd in re.findall(r"hostfwd=[^,\s]*", v):
                    count += 1
                    if not re.match(r"hostfwd=(tcp|udp):127\.0\.0\.1:", fwd):
                        print(f"  {f}: QEMU option {fwd} does not bind 127.0.0.1", file=sys.stderr)
                        ok = False
    if ok:
        print(f"  {count} forward(s) checked (a map over ports counts once), all bind 127.0.0.1")
    return ok


def check_readme_modules(readme, flake, test):
    text = open(readme).read()
    m = re.search(r"Importing the modules into a host\b.*?```nix\n(.*?)```", text, re.S)
    if not m:
        print(f"  {readme}: no host example (```nix after 'Importing the modules into a host')", file=sys.stderr)
        return False
    example = m.group(1)
    with tempfile.NamedTemporaryFile("w", suffix=".nix") as tmp:
        tmp.write(example)
        tmp.flush()
        parse(tmp.name)  # the example must at least be valid Nix
    named = sorted(set(re.findall(r"cdc-lake\.nixosModules\.([A-Za-z0-9_'-]+)", example)))
    if not named:
        print(f"  {readme}: the host example names no cdc-lake.nixosModules.*", file=sys.stderr)
        return False

    toks = tokens(parse(flake))
    sets = [s for s in assignments(toks, "nixosModules") if toks[s][0] == "{"]
    if len(sets) != 1:
        print(f"  {flake}: nixosModules is not one literal attribute set", file=sys.stderr)
        return False
    exported = sorted(name for name, _ in bindings(toks, sets[0]))
    ok = True
    for name in named:
        if name not in exported:
            print(f"  {readme}: host example imports nixosModules.{name}, which {flake} does not export ({', '.join(exported)})", file=sys.stderr)
            ok = False

    # The two-node test's sink host must import what the README does.
    toks = tokens(parse(test))
    imported = None
    for start in assignments(toks, "sink"):
        if toks[start][0] == "{":
            for name, v in bindings(toks, start):
                if name == "imports":
                    end = value_end(toks, v)
                    imported = sorted(
                        toks[k + 2][1]
                        for k in range(v, end - 2)
                        if toks[k] == ("I", "nixosModules") and toks[k - 1][0] == "." and toks[k + 1][0] == "."
                    )
    if imported != named:
        print(f"  {test}: the sink node imports {imported}, the README's host example {named}", file=sys.stderr)
        ok = False
    if ok:
        print(f"  host example imports {', '.join(named)}; flake exports {', '.join(exported)}; {test} imports the same")
    return ok


def main(argv):
    cmd, args = argv[1], argv[2:]
    if cmd == "nixpkgs-config":
        return check_nixpkgs_config(args)
    if cmd == "port-forwards":
        return check_port_forwards(args)
    if cmd == "readme-modules":
        return check_readme_modules(*args)
    sys.exit(f"unknown check {cmd}")


if __name__ == "__main__":
    sys.exit(0 if main(sys.argv) else 1)
