"""`python -m mmtrain.assets ...`: the same as `mmtrain assets ...`."""

import sys

from mmtrain.assets.cli import main

sys.exit(main(prog="python -m mmtrain.assets"))
