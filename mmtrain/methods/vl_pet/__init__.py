"""VL-PET: granularity-controlled modules on an encoder-decoder LM (T5, BART).

`modules.py`: the gates, the modules and their attachment by hooks; `method.py`: attaching them as
`model.llm.vl_pet` asks; `config.py`: the settings.
"""
