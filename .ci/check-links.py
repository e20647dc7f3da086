#!/usr/bin/env python3
"""Every relative link in the given Markdown files resolves.

  check-links.py FILE.md...

A link `[text](target)` whose target is not a URL must name an existing
file or directory (relative to the linking file), and a `#anchor`, alone or
after a Markdown file, must be a heading of that file, spelled the way
GitHub spells heading anchors. Code blocks and code spans are skipped.
Prints each broken link and exits 1 if there is any. Python 3 stdlib only.
"""

import os
import re
import sys

FENCE = re.compile(r"^\s*(```|~~~)")
LINK = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
CODE_SPAN = re.compile(r"(`+).*?\1")


def prose_lines(path):
    """(line number, text) of the lines outside fenced code blocks."""
    fenced = False
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if FENCE.match(line):
                fenced = not fenced
                continue
            if not fenced:
                yield n, line.rstrip("\n")


def slug(heading):
    """GitHub's anchor of a heading: markup dropped, lowercased, punctuation
    removed (letters, digits, '_', '-' and spaces stay), spaces to '-'."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link: its text
    text = text.replace("`", "").strip().lower()
    text = "".join(c for c in text if c.isalnum() or c in "_- ")
    return text.replace(" ", "-")


_anchors = {}


def anchors(path):
    """The anchors of a file's headings; a repeated one gets -1, -2, ..."""
    if path not in _anchors:
        seen, out = {}, set()
        for _, line in prose_lines(path):
            m = re.match(r"^#{1,6}\s+(.*?)\s*#*\s*$", line)
            if m:
                base = slug(m.group(1))
                k = seen.get(base, 0)
                seen[base] = k + 1
                out.add(base if k == 0 else f"{base}-{k}")
        _anchors[path] = out
    return _anchors[path]


def check(path):
    broken = 0
    for n, line in prose_lines(path):
        for target in LINK.findall(CODE_SPAN.sub("", line)):
            if re.match(r"^[a-z][a-z0-9+.-]*:", target, re.I):
                continue  # a URL (https:, mailto:, ...): not checked here
            file, _, anchor = target.partition("#")
            dest = os.path.normpath(os.path.join(os.path.dirname(path), file)) if file else path
            if not os.path.exists(dest):
                problem = f"{dest} does not exist"
            elif anchor and dest.endswith(".md") and anchor not in anchors(dest):
                problem = f"{dest} has no heading with anchor #{anchor}"
            else:
                continue
            print(f"{path}:{n}: ({target}): {problem}")
            broken += 1
    return broken


def main(paths):
    if not paths:
        sys.exit(__doc__)
    broken = sum(check(p) for p in paths)
    print(f"{len(paths)} files: {'no broken links' if not broken else f'{broken} broken links'}")
    return 1 if broken else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
