"""``python -m qwen3_rerank_plugins``: the ``qwen3-rerank`` command line."""

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
