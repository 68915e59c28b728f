"""``lor2c-assets``: prepare the offline model and data cache."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from lor2c_ds.assets import default_home, prepare_assets
from lor2c_ds.quality_assets import prepare_quality_tasks

logger = logging.getLogger("lor2c-assets")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="lor2c-assets",
        description="Prepare the offline cache of models and data sets (idempotent).")
    parser.add_argument("--home", type=Path, default=None,
                        help=f"cache root (default: $LOR2C_DS_HOME or {default_home()})")
    parser.add_argument("--no-decoder", action="store_true",
                        help="skip the SmolLM2 decoder and the chitchat data")
    parser.add_argument("--bf16", action="store_true",
                        help="also write bf16 copies of the models (<name>-bf16), as hub checkpoints ship")
    parser.add_argument("--quality", action="store_true",
                        help="also build the quality benchmark's tasks (data/quality/: sentiment, topic, pair, entailment, chat)")
    args = parser.parse_args(argv)

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        paths = prepare_assets(args.home, decoder=not args.no_decoder, bf16=args.bf16)
        if args.quality:
            paths.update(prepare_quality_tasks(args.home))
    except Exception as exc:  # one clear message, no traceback
        logger.debug("details", exc_info=True)
        print(f"lor2c-assets: error: {exc}", file=sys.stderr)
        return 1
    for name, path in paths.items():
        logger.info("%-8s %s", name, path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
