"""Train the FACT face adapter — PLACEHOLDER: the trainer is not built yet.

It arrives with the face-adapter work (see README "Status"). Until then running this file says so and
exits with status 2; nothing is trained and nothing is written.
"""

from __future__ import annotations

import sys


def main() -> int:
    """Tell the user the trainer does not exist yet."""
    sys.stderr.write(
        "train_adapter.py: the FACT face-adapter trainer is not built yet (see README Status).\n"
    )
    return 2


if __name__ == "__main__":
    sys.exit(main())
