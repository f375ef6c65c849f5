"""Write the deterministic dummy data set: wavs and train/val/noise manifests (NeMo keys).

python scripts/make_data.py --config config/config.yaml --out results/data
python scripts/make_data.py --data '{"seed": 1, ...}' --out results/data
"""

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

import yaml  # noqa: E402

from nestalign.dummy_data import make_data  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--config", help="YAML file with a `data:` section")
    source.add_argument("--data", help="the `data:` section as JSON")
    parser.add_argument("--out", required=True, help="output folder")
    args = parser.parse_args()
    if args.config:
        cfg = yaml.safe_load(Path(args.config).read_text())
        cfg = cfg.get("data", cfg)
    else:
        cfg = json.loads(args.data)
    for name, path in make_data(cfg, args.out).items():
        print(f"{name}: {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
