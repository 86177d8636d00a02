"""MMA (LaVIN): mixture-of-modality router adapters in the vision tower and the frozen LLM.

`adapters.py`: the router adapter, its attachment by forward hooks, the modality token; `method.py`:
attaching them as `model.vision.adapter` / `model.llm.adapter` ask; `config.py`: the settings.
"""
