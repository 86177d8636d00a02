"""LoRA on the LLM through PEFT, the parameter-efficient baseline.

`inject.py`: injecting and flagging the LoRA matrices; `method.py`: attaching them as
`model.llm.lora` asks; `config.py`: the settings.
"""
