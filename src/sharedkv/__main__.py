"""``python -m sharedkv`` and the ``sharedkv`` command."""

from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    try:
        from ._cli import main as cli_main  # type: ignore[import-not-found, unused-ignore]
    except ImportError as exc:
        if args[:1] == ["demo"]:
            from ._demo import run_demo

            return 0 if run_demo() else 1
        print(
            f"the sharedkv command needs its extra ({exc.name} is missing): "
            "pip install 'sharedkv[cli]'",
            file=sys.stderr,
        )
        return 2
    return int(cli_main(args))


if __name__ == "__main__":
    sys.exit(main())
