"""The command line bench.py gives the other cullers (floor.py, run_upstream.py): one for both,
the same as the options of ours that matter here."""

import argparse


def parse(description: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--url", required=True)
    parser.add_argument("--timeout", type=int, default=600)
    parser.add_argument("--concurrency", type=int, default=10)
    parser.add_argument("--api-page-size", type=int, default=0)
    return parser.parse_args()
