"""Stage pipelines: a recipe of training stages (each inheriting weights from earlier ones, each
with its evaluations) run in order in one resumable run folder (`mmtrain run RECIPE.yaml`)."""

from mmtrain.pipeline.recipe import EvalSpec, InheritSpec, LaunchConfig, Pipeline, Stage, load_recipe

__all__ = ["EvalSpec", "InheritSpec", "LaunchConfig", "Pipeline", "Stage", "load_recipe"]
