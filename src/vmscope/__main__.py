"""python -m vmscope"""

import sys

from vmscope.cli.main import main

sys.exit(main())
