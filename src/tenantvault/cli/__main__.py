import sys

from tenantvault.cli.commands import main

sys.exit(main())
