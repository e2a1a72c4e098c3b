import sys

from fastinterest.cli import main

sys.exit(main())
