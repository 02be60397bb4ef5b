"""``python -m gradparity`` is ``gradparity``."""
import sys

from gradparity.cli import main

sys.exit(main())
