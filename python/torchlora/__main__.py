"""``python -m torchlora`` runs the ``torchlora`` command."""

import sys

from .cli import main

sys.exit(main())
