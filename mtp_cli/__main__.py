import sys

from mtp_cli.main import main

sys.exit(main())
