import sys

from normexport.cli import main

sys.exit(main())
