"""Stage params: ``params.yaml`` + this run's ``-S`` overrides (``.mmp/overrides.yaml``) → ``.mmp/run_params.yaml``,
the file the other stages read. The user's params.yaml is only ever read."""

from __future__ import annotations

import argparse
import sys

from mmplatform.config import OVERRIDES_FILE, RUN_PARAMS, ConfigError, write_run_params


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m pipelines.params")
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--overrides", default=OVERRIDES_FILE)
    ap.add_argument("--out", default=RUN_PARAMS)
    args = ap.parse_args(argv)
    try:
        write_run_params(args.params, args.overrides, args.out)
    except ConfigError as exc:
        sys.stderr.write(f"error: params: {exc}\n")
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
