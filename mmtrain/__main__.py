"""`python -m mmtrain ...` is the `mmtrain` console command."""

import sys

from mmtrain.cli import main

sys.exit(main())
