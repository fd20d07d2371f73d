"""`python -m peftray.service --host 127.0.0.1 --port 8080`: the control plane as a plain process.

Settings come from the environment (see `peftray.service.settings`); the admin token is read from
PEFTRAY_SERVICE_ADMIN_TOKEN, never from the command line (which other users can see in `ps`).
"""

from __future__ import annotations

import argparse
import logging


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m peftray.service")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8080)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")

    import uvicorn

    from peftray.service.app import create_app

    uvicorn.run(create_app(), host=args.host, port=args.port, log_level="warning", access_log=False,
                timeout_graceful_shutdown=5)


if __name__ == "__main__":
    main()
