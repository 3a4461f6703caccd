"""The floor for the benchmark: the least a `requests` client can do for the same pass.

It lists the users (the first page, then the others concurrently) and sends a DELETE for each
server last active before the timeout, through one requests.Session from `concurrency` threads,
and does nothing else: no checks, no retries, no logging, no report. Its wall time over the bound
is what the fake Hub, this machine and `requests` cost on their own, which no culler built on
them can beat. Started by bench.py as a child process like the cullers; the token comes from
JUPYTERHUB_API_TOKEN; prints one JSON line with the pass's own duration on stdout.
"""

import json
import os
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta
from urllib.parse import quote

import passargs  # beside this script
import requests
from requests.adapters import HTTPAdapter

PAGES = "application/jupyterhub-pagination+json"


def main():
    args = passargs.parse(__doc__.splitlines()[0])

    start = time.perf_counter()
    session = requests.Session()
    session.mount("http://", HTTPAdapter(pool_maxsize=args.concurrency, pool_block=True))
    session.trust_env = False
    session.headers["Authorization"] = f"token {os.environ['JUPYTERHUB_API_TOKEN']}"
    limit = {"limit": args.api_page_size} if args.api_page_size else {}

    def page(offset):
        params = {"state": "ready", "offset": offset, **limit}
        return session.get(f"{args.url}/users", params=params, headers={"Accept": PAGES}).json()

    def stop(path):
        return session.delete(f"{args.url}{path}").status_code

    cutoff = datetime.now(UTC) - timedelta(seconds=args.timeout)
    with ThreadPoolExecutor(args.concurrency) as pool:
        first = page(0)
        size, total = first["_pagination"]["limit"], first["_pagination"]["total"]
        pages = [first, *pool.map(page, range(size, total, size))]
        paths = [
            f"/users/{quote(user['name'], safe='')}/servers/{quote(name, safe='')}"
            if name
            else f"/users/{quote(user['name'], safe='')}/server"
            for answer in pages
            for user in answer["items"]
            for name, server in user["servers"].items()
            if datetime.fromisoformat(server["last_activity"]) < cutoff
        ]
        codes = list(pool.map(stop, paths))
    assert set(codes) <= {204}, set(codes)
    print(json.dumps({"duration_s": time.perf_counter() - start}))


if __name__ == "__main__":
    main()
