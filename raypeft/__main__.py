import sys

from raypeft.cli import main

sys.exit(main())
