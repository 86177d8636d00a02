"""The methods, each a plug-in folder: `vpgtrans`, `grafting`, `mma`, `vl_pet`, `lora`.

Each folder has `config.py` (its settings and the run-config sections they occupy) and `method.py`
(`METHOD`, the hooks the core calls); `mmtrain.config.methods` finds them. Nothing in the core
(config, data, models, engine) imports this package, and no method imports another.
"""
