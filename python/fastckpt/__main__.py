import sys

from fastckpt.cli import main

sys.exit(main())
