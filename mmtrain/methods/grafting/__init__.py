"""LLM surrogates and zero-shot grafting.

A surrogate of a target LLM keeps the target's layers 0..K-1, a trainable *translator* (a decoder
layer initialised as a copy of layer K) and the target's last layer, with the target's embeddings,
final norm and LM head. The vision side is trained against the surrogate and then plugged into the
full target with no further training ("grafting").

* `trajectory.py`: the logit-lens KL trajectory that picks the cut K.
* `layout.py`, `stream.py`, `build.py`: the surrogate built by streaming the target's (sharded)
  safetensors checkpoint tensor by tensor, so a 70B target never has to fit in memory.
* `graft.py`: load a trained vision side into another (the full target) LLM.
* `method.py`: the plug-in: flags a surrogate's translator for `trainable: adapters` (`attach`) and
  puts a run's vision side on another LLM for `mmtrain eval --graft-llm` (`retarget`).
"""
