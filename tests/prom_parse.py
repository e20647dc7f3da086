"""Parses a Prometheus text exposition (a scrape of /metrics) for the tests.

    prom_parse.py < scrape.txt

Reads the exposition on stdin with the reference parser of the Prometheus
client library (`prometheus_client.parser`, installed by tests/readers.sh)
rather than the services' own code, so that a test also proves a real
scraper can read what the service serves. Prints one JSON array, one object
per sample:

    {"family": "tweetgen_rows", "type": "counter",
     "name": "tweetgen_rows_total", "labels": {"table": "users", "op": "insert"},
     "value": 42.0}

A non-finite value is printed as the string "NaN", "+Inf" or "-Inf" (JSON has
no such numbers). Input the parser rejects exits 1 with its error on stderr.
"""

import json
import math
import sys

from prometheus_client.parser import text_string_to_metric_families


def value(v):
    if math.isnan(v):
        return "NaN"
    if math.isinf(v):
        return "+Inf" if v > 0 else "-Inf"
    return v


def main():
    text = sys.stdin.read()
    samples = []
    try:
        for family in text_string_to_metric_families(text):
            for s in family.samples:
                samples.append(
                    {
                        "family": family.name,
                        "type": family.type,
                        "name": s.name,
                        "labels": dict(s.labels),
                        "value": value(s.value),
                    }
                )
    except ValueError as e:
        print(f"prom_parse.py: not a valid exposition: {e}", file=sys.stderr)
        return 1
    json.dump(samples, sys.stdout)
    print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
