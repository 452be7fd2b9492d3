"""`python -m nexus_retrofit.train RECIPE.yaml [--key value ...]`: the entry point for `accelerate launch -m`."""

from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> int:
    from .errors import RecipeError
    from .run import run_training

    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help") or argv[0].startswith("--"):
        print("usage: python -m nexus_retrofit.train RECIPE.yaml [--key value ...]", file=sys.stderr)
        return 0 if argv and argv[0] in ("-h", "--help") else 2
    try:
        result = run_training(argv[0], argv[1:])
    except RecipeError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"model written to {result.output_dir}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
