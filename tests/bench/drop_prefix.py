"""Deletes every object under a prefix of the stack's bucket: what a
benchmark wrote, once it has measured it. A drain or a sustained run
writes one to two GB, and a machine that keeps its stack between
sessions fills its disk with them otherwise (MinIO then refuses every
write with 507).

    drop_prefix.py PREFIX

Refuses an empty prefix (the stack's own pipeline writes at the top) and
one that does not look like a benchmark's (`<name>-<digits>`).
"""

import os
import re
import sys

from pyarrow import fs

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from lake_read import BUCKET, ENDPOINT, KEY, SECRET  # noqa: E402


def main():
    if len(sys.argv) != 2 or not re.fullmatch(r"[a-z][a-z0-9-]*-[0-9]+", sys.argv[1]):
        sys.exit(f"usage: drop_prefix.py NAME-DIGITS (got {sys.argv[1:]})")
    s3 = fs.S3FileSystem(
        access_key=KEY,
        secret_key=SECRET,
        endpoint_override=ENDPOINT,
        scheme="https" if ENDPOINT.startswith("https://") else "http",
        region="us-east-1",
    )
    path = f"{BUCKET}/{sys.argv[1]}"
    if s3.get_file_info(path).type == fs.FileType.NotFound:
        return
    s3.delete_dir(path)


if __name__ == "__main__":
    main()
