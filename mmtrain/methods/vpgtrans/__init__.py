"""VPGTrans: move a visual prompt generator trained with a small LLM onto a large one.

`embeddings` reads input-embedding tables (from checkpoint files, or gathered from a live, possibly
ZeRO-3 partitioned model); `converter` pairs the two LLMs' token embeddings over a text corpus and
fits the linear word converter; `merge` composes it with the source projector; `init` applies all
of that as an `init` source of a run; `speedup` computes the paper's speed-up between a VPGTrans run
and training from scratch; `cli` is `mmtrain transfer ...`; `config` holds the word converter's
settings (`init[].word_converter`, a recipe's `inherit[].word_converter`) and `method` plugs the
converted init into the core (`MethodSpec.load_init`, `resolve_inherit`).
"""
