"""`python -m selfsup ...` is the `selfsup` command (and so is `torchrun ... -m selfsup train ...`)."""
import sys

from .cli import main

sys.exit(main())
