import sys

from asympo.cli import main

sys.exit(main())
