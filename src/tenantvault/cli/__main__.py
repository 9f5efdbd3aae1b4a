import sys

from tenantvault.cli import main

sys.exit(main())
