"""`python -m mmtrain.pipeline RECIPE.yaml ...` is `mmtrain run RECIPE.yaml ...`."""

import sys

from mmtrain.pipeline.cli import main

sys.exit(main(prog="python -m mmtrain.pipeline"))
