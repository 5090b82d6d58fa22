"""``python -m gpipe.cli``: the ``gpipe`` command (torchrun relaunches use this form)."""

import sys

from gpipe.cli.main import main

sys.exit(main())
