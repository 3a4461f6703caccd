"""Run one pass of the upstream jupyterhub-idle-culler, for the benchmark.

Upstream's own command loops forever (it culls every `cull_every` seconds), so the benchmark
calls its `cull_idle` coroutine once instead. This script runs in the separate upstream venv
(.bench-venv/upstream) and is started by bench.py as a child process, so that its CPU time and
peak memory can be read from that child alone. The token comes from JUPYTERHUB_API_TOKEN, as
for the upstream service. Prints one JSON line with the pass's own duration on stdout.
"""

import asyncio
import json
import logging
import os
import sys
import time

import passargs  # beside this script
from jupyterhub_idle_culler import cull_idle


def main():
    args = passargs.parse(__doc__.splitlines()[0])

    # Upstream logs at INFO by default; keep that so both cullers do the same logging work.
    logger = logging.getLogger("upstream-idle-culler")
    logger.addHandler(logging.StreamHandler(sys.stderr))
    logger.setLevel(logging.INFO)

    start = time.perf_counter()
    asyncio.run(
        cull_idle(
            url=args.url,
            api_token=os.environ["JUPYTERHUB_API_TOKEN"],
            inactive_limit=args.timeout,
            logger=logger,
            concurrency=args.concurrency,
            api_page_size=args.api_page_size,
        )
    )
    print(json.dumps({"duration_s": time.perf_counter() - start}))


if __name__ == "__main__":
    main()
