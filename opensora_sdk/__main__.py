"""`python -m opensora_sdk ...` runs the `opensora` command."""

import sys

from opensora_sdk.cli import main

sys.exit(main())
