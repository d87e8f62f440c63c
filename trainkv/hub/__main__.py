import sys

from .push import main

sys.exit(main())
