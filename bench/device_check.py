"""The GPU path proven in one short run (issue 30): the student's CUDA path (bf16 autocast, attention within each packed
example, loss and gradients against a masked reference, one step of each arm), training throughput against HF
`Trainer` with MFU, scaffolded decoding against `generate`, and a GPU-scale run of the experiment bed (both arms
trained, validation and test scored), printed and written as JSON. On a machine without CUDA, or with `--tiny`, a
tiny CPU version of every part (what `make device-check` and the test suite run, so the script cannot rot).

    python3 bench/device_check.py --out $OUT/device_check.json     # the GPU machine, from the repository root
    .venv/bin/python bench/device_check.py --tiny                   # here: every part, tiny, on the CPU

The GPU machine has torch, transformers, tokenizers, safetensors, accelerate, pandas, pyarrow and numpy but not
pydantic, duckdb, mlflow, dagster or datasets, and no internet. This file imports only the standard library until it
has made pydantic importable: from the wheels `bench/fetch_device_wheels.sh` downloaded into `bench/device_wheels/`
(git-ignored: carry it to the device), installed with `pip install --no-index --target bench/out/device_site`. The
parts (`bench/device_parts.py`) import no module that imports duckdb, mlflow, dagster or datasets
(tests/test_device_check.py runs this file with those blocked). See docs/gpu.md.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
WHEELS = REPO / "bench" / "device_wheels"
SITE = REPO / "bench" / "out" / "device_site"
DEFAULT_OUT = REPO / "bench" / "out" / "device_check.json"
CARRIED = ("pydantic",)  # what the library needs that the GPU machine lacks: it travels as wheels


def _missing() -> list[str]:
    return [name for name in CARRIED if importlib.util.find_spec(name) is None]


def ensure_carried(wheels: Path = WHEELS, site: Path = SITE) -> list[str]:
    """Make the carried packages importable: as installed, else from `site` (an earlier run's install), else by
    installing the wheels in `wheels` into `site` without an index. Returns what had to come from the wheels."""
    missing = _missing()
    if not missing:
        return []
    # first on the path: the wheels' typing-extensions must win over an older one beside torch
    sys.path.insert(0, str(site))
    importlib.invalidate_caches()
    if not _missing():
        return missing
    found = sorted(wheels.glob("*.whl"))
    if not found:
        raise SystemExit(
            f"{', '.join(missing)} not installed and no wheels in {wheels}: run `make device-wheels` (or "
            "bash bench/fetch_device_wheels.sh) where PyPI is reachable, and carry that folder to this machine"
        )
    print(f"installing {len(found)} carried wheels into {site} (no index)", flush=True)
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "--quiet", "--no-index", "--no-deps", "--target", str(site)]
        + [str(w) for w in found],
        check=True,
        env={**os.environ, "PIP_ROOT_USER_ACTION": "ignore"},  # the device runs as root, into a folder of its own
    )
    importlib.invalidate_caches()
    if _missing():
        raise SystemExit(f"{', '.join(_missing())} still not importable after installing the wheels into {site}")
    return missing


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--tiny", action="store_true", help="a tiny CPU version of every part (automatic without CUDA)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"the JSON report (default {DEFAULT_OUT})")
    parser.add_argument(
        "--preset",
        default="experiment",
        help="the bed's settings: a preset name or a preset .toml (default experiment)",
    )
    parser.add_argument(
        "--parts",
        default="attention,training,decoding,bed",
        help="comma-separated parts to run (default: all four)",
    )
    parser.add_argument("--problems", type=int, help="bed problems (default 50,000 on CUDA, 400 tiny)")
    parser.add_argument("--bed-steps", type=int, help="training steps per arm in the bed")
    parser.add_argument(
        "--peak-tflops", type=float, help="the device's peak dense bf16 TFLOP/s for MFU (default by name)"
    )
    parser.add_argument(
        "--deadline-s",
        type=float,
        help="skip the parts not yet started after this many seconds (default 300 on CUDA, none tiny): the bed, "
        "last and longest, is not begun when it would end past 8 minutes; the report is rewritten after each part",
    )
    parser.add_argument("--workdir", type=Path, help="models and data go here (default: a temporary folder)")
    parser.add_argument("--wheels", type=Path, default=WHEELS, help=f"carried wheels (default {WHEELS})")
    parser.add_argument("--site", type=Path, default=SITE, help=f"where they are installed (default {SITE})")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    carried = ensure_carried(args.wheels, args.site)
    if str(REPO) not in sys.path:  # the library and bench/ are used from the working tree: nothing is installed
        sys.path.insert(0, str(REPO))
    from bench import device_parts

    return device_parts.run(args, carried)


if __name__ == "__main__":
    sys.exit(main())
